// dsd_comm, dsd_mesh and the layout handle table, shared by the capi files that use them.
#pragma once

#include <atomic>
#include <memory>
#include <span>
#include <string>

#include "capi/src/handles.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "dsd/dsd.h"

// Reference-counted roots (dsd_comm_retain/_release, dsd_mesh_retain/_release). What they
// point to is shared further by the objects that keep it (meshes, models, checkpointers).
struct dsd_comm {
  dsd_comm(std::shared_ptr<dsd::Communicator> c, std::string b)
      : comm(std::move(c)), backend(std::move(b)) {}
  std::shared_ptr<dsd::Communicator> comm;
  std::string backend;  // what dsd_comm_backend() lends out
  std::atomic<uint32_t> refs{1};
};

struct dsd_mesh {
  explicit dsd_mesh(std::shared_ptr<const dsd::DeviceMesh> m) : mesh(std::move(m)) {}
  std::shared_ptr<const dsd::DeviceMesh> mesh;
  std::atomic<uint32_t> refs{1};
};

namespace dsd::capi {

// retain/release of a reference-counted root: the last release deletes it.
template <class Root>
Root* retain_root(Root* r) {
  if (r != nullptr) r->refs.fetch_add(1, std::memory_order_relaxed);
  return r;
}
template <class Root>
void release_root(Root* r) {
  if (r != nullptr && r->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete r;
}

// The communicator behind an optional dsd_comm (NULL: a single process).
std::shared_ptr<Communicator> comm_or_local(const dsd_comm* comm);

using LayoutPtr = std::shared_ptr<const Layout>;
using LayoutTable = HandleTable<LayoutPtr, HandleKind::kLayout>;
LayoutTable& layout_table();

inline Result<LayoutPtr> lookup(dsd_layout h) { return layout_table().get(h.bits); }
inline dsd_layout make_layout_handle(LayoutPtr l) { return dsd_layout{layout_table().insert(std::move(l))}; }


}  // namespace dsd::capi

// dsd_comm, dsd_mesh and the layout handle table, shared by the capi files that use them.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "capi/src/handles.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "dsd/dsd.h"

namespace dsd::checkpoint {
class AsyncCheckpointer;
}

struct dsd_comm {
  std::shared_ptr<dsd::Communicator> comm;
  std::string backend;  // what dsd_comm_backend() lends out
  // The async checkpointer of saves over this communicator, made on the first dsd_save_async
  // (its staging buffers and background thread live as long as the communicator).
  std::shared_ptr<dsd::checkpoint::AsyncCheckpointer> async;
};

struct dsd_mesh {
  std::shared_ptr<const dsd::DeviceMesh> mesh;
};

namespace dsd::capi {

using LayoutPtr = std::shared_ptr<const Layout>;
using LayoutTable = HandleTable<LayoutPtr, HandleKind::kLayout>;
LayoutTable& layout_table();

inline Result<LayoutPtr> lookup(dsd_layout h) { return layout_table().get(h.bits); }
inline dsd_layout make_layout_handle(LayoutPtr l) { return dsd_layout{layout_table().insert(std::move(l))}; }


}  // namespace dsd::capi

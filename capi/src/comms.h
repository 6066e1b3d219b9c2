// dsd_comm: a C reference to a communicator (shared by models, meshes and layouts).
#pragma once

#include <memory>

#include "core/dist/comm.h"
#include "dsd/dsd.h"

struct dsd_comm {
  std::shared_ptr<dsd::Communicator> comm;
};

namespace dsd::capi {

inline std::shared_ptr<Communicator> communicator_of(const dsd_comm* c) {
  return c != nullptr ? c->comm : nullptr;
}

}  // namespace dsd::capi

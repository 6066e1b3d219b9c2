// The process-wide tensor handle table, shared by every capi file.
#pragma once

#include "capi/src/handles.h"
#include "core/statedict/value.h"
#include "dsd/dsd.h"

namespace dsd::capi {

using TensorTable = HandleTable<TensorValue, HandleKind::kTensor>;
TensorTable& tensor_table();

inline Result<TensorValue> lookup(dsd_tensor h) { return tensor_table().get(h.bits); }
inline dsd_tensor make_handle(TensorValue v) { return dsd_tensor{tensor_table().insert(std::move(v))}; }

}  // namespace dsd::capi

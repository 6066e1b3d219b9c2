// dsd_state_dict: a reference to a dict or list node of a Value tree.
#pragma once

#include "core/base/result.h"
#include "core/statedict/value.h"
#include "dsd/dsd.h"

struct dsd_state_dict {
  dsd::Value node;  // holds a DictPtr or a ListPtr
};

namespace dsd::capi {

// A new C reference to a container.
dsd_state_dict* wrap(Value container);
// The dict behind `sd`; errors for NULL (naming `what`) and for a list.
Result<Dict*> as_dict(const dsd_state_dict* sd, const char* what);

}  // namespace dsd::capi

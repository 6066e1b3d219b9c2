// dsd_state_dict: a reference to a dict or list node of a Value tree.
#pragma once

#include <string>

#include "core/base/result.h"
#include "core/statedict/value.h"
#include "dsd/dsd.h"

struct dsd_state_dict {
  dsd::Value node;  // holds a DictPtr or a ListPtr
};

namespace dsd::capi {

// A new C reference to a container.
dsd_state_dict* wrap(Value container);

// The value at a position of a dict or list (sd not NULL); kInvalidArgument out of range.
Result<const Value*> value_at(const dsd_state_dict* sd, size_t index);
// "'key'" for a dict entry, "item i" for a list item: how messages name a position.
std::string describe(const dsd_state_dict* sd, size_t index);
// Stores a value as the writers do: a dict needs a key (an int key in an int-keyed dict, and
// replacing keeps the position); a list takes key NULL and appends.
Status put(dsd_state_dict* sd, const char* key, Value v);
// The dict behind `sd`; errors for NULL (naming `what`) and for a list.
Result<Dict*> as_dict(const dsd_state_dict* sd, const char* what);

}  // namespace dsd::capi

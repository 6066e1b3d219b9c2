// dsd_state_dict: a reference to a dict or list node of a Value tree.
#pragma once

#include <atomic>
#include <deque>
#include <mutex>
#include <string>

#include "core/base/result.h"
#include "core/statedict/value.h"
#include "dsd/dsd.h"

// One C reference to a container (reference-counted: dsd_state_dict_retain/_release).
struct dsd_state_dict {
  explicit dsd_state_dict(dsd::Value container) : node(std::move(container)) {}

  dsd::Value node;  // holds a DictPtr or a ListPtr
  std::atomic<uint32_t> refs{1};

  // Strings computed by const calls and handed out borrowed (dsd_state_dict_equal's
  // description): kept until the reference is released. Node-based, so pointers stay valid.
  mutable std::mutex strings_mu;
  mutable std::deque<std::string> strings;
  const char* keep(std::string s) const {
    std::lock_guard<std::mutex> lock(strings_mu);
    for (const std::string& k : strings) {
      if (k == s) return k.c_str();
    }
    return strings.emplace_back(std::move(s)).c_str();
  }
};

namespace dsd::capi {

// The C ABI's DSD_KIND_* code of a Kind (the C codes start at 1: 0 is never a valid enum).
constexpr dsd_kind to_c_kind(Kind k) { return static_cast<dsd_kind>(k) + 1; }
static_assert(to_c_kind(Kind::kNone) == DSD_KIND_NONE && to_c_kind(Kind::kBool) == DSD_KIND_BOOL &&
              to_c_kind(Kind::kInt) == DSD_KIND_INT && to_c_kind(Kind::kDouble) == DSD_KIND_DOUBLE &&
              to_c_kind(Kind::kString) == DSD_KIND_STRING && to_c_kind(Kind::kBytes) == DSD_KIND_BYTES &&
              to_c_kind(Kind::kTensor) == DSD_KIND_TENSOR && to_c_kind(Kind::kList) == DSD_KIND_LIST &&
              to_c_kind(Kind::kDict) == DSD_KIND_DICT);

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

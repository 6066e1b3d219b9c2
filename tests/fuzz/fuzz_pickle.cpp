// libFuzzer target: the restricted unpickler with the DCP metadata allow-list (plus torch.save's
// tensor globals), then what dsd does with a parsed tree: render it, decode it as DCP
// metadata, and write it back, which must read again.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/formats/dcp_metadata.h"
#include "core/formats/pickle.h"

namespace {

const dsd::PickleAllowList& allow_list() {
  static const dsd::PickleAllowList allow = [] {
    dsd::PickleAllowList a = dsd::dcp::metadata_allow_list();
    a.allow("torch._utils", "_rebuild_tensor_v2");
    a.allow("torch._utils", "_rebuild_tensor_v3");
    a.allow("torch._utils", "_rebuild_parameter");
    a.allow("torch", "FloatStorage");
    a.allow("torch.storage", "UntypedStorage");
    a.allow("builtins", "bytes");
    a.allow("builtins", "bytearray");
    return a;
  }();
  return allow;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  dsd::PickleReadOptions options;
  options.allow = &allow_list();
  options.allow_persistent_ids = true;
  options.max_depth = 64;
  dsd::Result<dsd::PickleValue> v = dsd::pickle_loads(bytes, options);
  if (!v.ok()) return 0;
  (void)dsd::pickle_repr(*v);
  (void)dsd::dcp::metadata_from_pickle(*v);
  dsd::Result<std::string> again = dsd::pickle_dumps(*v);
  if (again.ok()) {
    // The writer spells bytes and sets as calls, two levels deeper than the leaf they were.
    options.max_depth = 3 * 64;
    if (!dsd::pickle_loads(*again, options).ok()) __builtin_trap();
  }
  return 0;
}

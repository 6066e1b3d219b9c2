// dsd.h compiles alone as C++20 (-Wall -Wextra -Wpedantic -Werror), declarations in extern "C".
// The static checks are the header's conventions that a compiler can see.
#include "dsd/dsd.h"

#include <cstddef>
#include <type_traits>

static_assert(std::is_same_v<dsd_status, int32_t>);
static_assert(sizeof(dsd_tensor) == 8 && sizeof(dsd_layout) == 8);
static_assert(std::is_trivially_copyable_v<dsd_tensor> && std::is_trivially_copyable_v<dsd_layout>);

// Enumerations are typedef int32_t, and 0 is never one of their values.
static_assert(std::is_same_v<dsd_dtype, int32_t> && std::is_same_v<dsd_device_type, int32_t> &&
              std::is_same_v<dsd_kind, int32_t> && std::is_same_v<dsd_placement_kind, int32_t> &&
              std::is_same_v<dsd_key_list, int32_t> && std::is_same_v<dsd_wrapper_kind, int32_t> &&
              std::is_same_v<dsd_format, int32_t>);
static_assert(DSD_DTYPE_BOOL == 1 && DSD_DEVICE_CPU == 1 && DSD_KIND_NONE == 1 &&
              DSD_PLACEMENT_REPLICATE == 1 && DSD_KEYS_MISSING == 1 && DSD_WRAPPER_DDP == 1 &&
              DSD_FORMAT_DSD == 1);

// Option structs start with uint32_t struct_size.
template <class T>
constexpr bool starts_with_struct_size =
    offsetof(T, struct_size) == 0 && std::is_same_v<decltype(T::struct_size), uint32_t>;
static_assert(starts_with_struct_size<dsd_comm_options> &&
              starts_with_struct_size<dsd_state_dict_options> &&
              starts_with_struct_size<dsd_checkpoint_save_options> &&
              starts_with_struct_size<dsd_checkpoint_load_options> &&
              starts_with_struct_size<dsd_format_convert_options>);

int main() { return static_cast<int>(dsd_abi_version() >> 16) - DSD_ABI_VERSION_MAJOR; }

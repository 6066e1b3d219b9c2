// dsd.h compiles alone as C++20 (-Wall -Wextra -Wpedantic -Werror), declarations in extern "C".
#include "dsd/dsd.h"

#include <type_traits>

static_assert(std::is_same_v<dsd_status, int32_t>);
static_assert(sizeof(dsd_tensor) == 8);
static_assert(std::is_trivially_copyable_v<dsd_tensor>);

int main() { return static_cast<int>(dsd_abi_version() >> 16) - DSD_ABI_VERSION_MAJOR; }

/* dsd.h compiles alone as strict C11 (-Wall -Wextra -Wpedantic -Werror). */
#include "dsd/dsd.h"

int main(void) {
  dsd_tensor t = {0};
  dsd_status (*fn)(dsd_tensor, dsd_error**) = dsd_tensor_release;
  (void)fn;
  return (int)(t.bits + (dsd_abi_version() >> 16) - DSD_ABI_VERSION_MAJOR);
}

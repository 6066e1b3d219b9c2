/* dsd: distributed state dicts and checkpoints. The C ABI.
 *
 * Include this header from C (C11) or C++. Everything is declared in dsd_decls.h, which
 * Python's cffi also reads verbatim; see its top comment for the conventions. */
#ifndef DSD_DSD_H
#define DSD_DSD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "dsd/dsd_decls.h"

#ifdef __cplusplus
}
#endif

#endif /* DSD_DSD_H */

// Include first in every capi source file: the C header's declarations get default
// visibility, so exactly the dsd_* functions leave the library (everything else is built
// with -fvisibility=hidden, and the version script dsd.map lists dsd_* only).
#pragma once

#pragma GCC visibility push(default)
#include "dsd/dsd.h"
#pragma GCC visibility pop

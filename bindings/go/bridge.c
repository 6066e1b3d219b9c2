#include "bridge.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "_cgo_export.h"

static void release_trampoline(void* user_data) { dsdgoRelease((uintptr_t)user_data); }

dsd_status dsdgo_tensor_from_blob(void* data, dsd_dtype dtype, const int64_t* shape, size_t ndim,
                                  const int64_t* strides, dsd_device device, bool read_only,
                                  uintptr_t release_handle, dsd_tensor* out, dsd_error** err) {
  return dsd_tensor_from_blob(data, dtype, shape, ndim, strides, device, read_only,
                              release_handle != 0 ? release_trampoline : NULL,
                              (void*)release_handle, out, err);
}

static dsd_status materialize_trampoline(void* user_data, dsd_optim* optim, const dsd_tensor* params,
                                         const size_t* pids, size_t count) {
  return dsdgoMaterialize((uintptr_t)user_data, optim, (dsd_tensor*)params, (size_t*)pids, count);
}

dsd_status dsdgo_optim_set_materialize(dsd_optim* optim, uintptr_t handle, dsd_error** err) {
  return dsd_optim_set_materialize(optim, handle != 0 ? materialize_trampoline : NULL, (void*)handle,
                                   err);
}

struct dsdgo_buffer {
  atomic_size_t refs;
  void* data;
};

dsdgo_buffer* dsdgo_buffer_new(size_t nbytes) {
  const size_t rounded = nbytes == 0 ? 64 : (nbytes + 63) / 64 * 64;
  if (rounded < nbytes) return NULL;
  dsdgo_buffer* b = malloc(sizeof *b);
  if (b == NULL) return NULL;
  b->data = aligned_alloc(64, rounded);
  if (b->data == NULL) {
    free(b);
    return NULL;
  }
  memset(b->data, 0, rounded);
  atomic_init(&b->refs, 1);
  return b;
}

void* dsdgo_buffer_data(const dsdgo_buffer* buffer) { return buffer->data; }

void dsdgo_buffer_unref(void* buffer) {
  dsdgo_buffer* b = buffer;
  if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1) {
    free(b->data);
    free(b);
  }
}

dsd_status dsdgo_buffer_wrap(dsdgo_buffer* buffer, size_t offset, dsd_dtype dtype,
                             const int64_t* shape, size_t ndim, bool read_only, dsd_tensor* out,
                             dsd_error** err) {
  atomic_fetch_add_explicit(&buffer->refs, 1, memory_order_relaxed);
  /* dsd calls the release function on failure too, which drops this reference again. */
  return dsd_tensor_from_blob((char*)buffer->data + offset, dtype, shape, ndim, NULL,
                              (dsd_device){DSD_DEVICE_CPU, 0}, read_only, dsdgo_buffer_unref, buffer,
                              out, err);
}

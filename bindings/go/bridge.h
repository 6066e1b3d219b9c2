/* C helpers of the Go binding: trampolines into exported Go functions, and host buffers.
 * Declarations only, since files with //export may include nothing else. */
#ifndef DSDGO_BRIDGE_H
#define DSDGO_BRIDGE_H

#include <stddef.h>
#include <stdint.h>
#include <dsd/dsd.h>

/* dsd_tensor_from_blob with, when release_handle is not 0, a release function that calls
 * the Go function stored under that runtime/cgo.Handle. */
dsd_status dsdgo_tensor_from_blob(void* data, dsd_dtype dtype, const int64_t* shape, size_t ndim,
                                  const int64_t* strides, dsd_device device, bool read_only,
                                  uintptr_t release_handle, dsd_tensor* out, dsd_error** err);

/* dsd_optim_set_materialize with the Go trampoline and a runtime/cgo.Handle as user data;
 * handle 0 clears the callback. */
dsd_status dsdgo_optim_set_materialize(dsd_optim* optim, uintptr_t handle, dsd_error** err);

/* A host buffer: zeroed, 64-byte aligned C memory with a reference count shared by the Go
 * HostBuffer (one reference) and every tensor dsd made over it (one each). */
typedef struct dsdgo_buffer dsdgo_buffer;

/* A new buffer of nbytes (at least one byte is allocated, so data is never NULL), holding
 * one reference; NULL when out of memory. */
dsdgo_buffer* dsdgo_buffer_new(size_t nbytes);
void* dsdgo_buffer_data(const dsdgo_buffer* buffer);
/* Drops a reference; the last one frees the memory. A dsd_release_fn. */
void dsdgo_buffer_unref(void* buffer);
/* dsd_tensor_from_blob over buffer's memory from byte `offset`, contiguous; the tensor holds
 * a reference to the buffer until dsd lets go of it. */
dsd_status dsdgo_buffer_wrap(dsdgo_buffer* buffer, size_t offset, dsd_dtype dtype,
                             const int64_t* shape, size_t ndim, bool read_only, dsd_tensor* out,
                             dsd_error** err);

#endif

/* GPU memory a C program owns, lent to dsd without a copy.
 *
 * cudaMalloc's a [1024, 256] float32 buffer on the last visible device, wraps it with
 * dsd_tensor_from_blob (device type and index given), checks what dsd reports back (same
 * address, device kept), and lets dsd give the memory back through the release callback,
 * which runs exactly once, when the last reference is dropped.
 *
 * Built only where Meson finds the CUDA runtime; exits 77 (a skip for Meson) when no CUDA
 * device is visible. */
#include <dsd/dsd.h>

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define ROWS 1024
#define COLS 256

typedef struct lent_memory {
  void* data;
  int releases;
} lent_memory;

/* dsd calls this once when it no longer refers to the memory (any thread). */
static void give_back(void* user_data) {
  lent_memory* m = user_data;
  cudaFree(m->data);
  m->releases++;
}

static int fail_dsd(const char* what, dsd_error* err) {
  fprintf(stderr, "cuda_from_blob: %s: %s\n", what, err ? dsd_error_message(err) : "(no message)");
  dsd_error_free(err);
  return 1;
}

static int fail_cuda(const char* what, cudaError_t e) {
  fprintf(stderr, "cuda_from_blob: %s: %s\n", what, cudaGetErrorString(e));
  return 1;
}

int main(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("no CUDA device visible: skipping\n");
    return 77;
  }
  const int device = count - 1; /* a nonzero index where there are several devices */
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return fail_cuda("cudaSetDevice", e);

  lent_memory mem = {NULL, 0};
  const size_t nbytes = (size_t)ROWS * COLS * sizeof(float);
  if ((e = cudaMalloc(&mem.data, nbytes)) != cudaSuccess) return fail_cuda("cudaMalloc", e);
  float* host = malloc(nbytes);
  if (host == NULL) return 1;
  for (size_t i = 0; i < (size_t)ROWS * COLS; ++i) host[i] = (float)i;
  if ((e = cudaMemcpy(mem.data, host, nbytes, cudaMemcpyHostToDevice)) != cudaSuccess)
    return fail_cuda("cudaMemcpy", e);

  const int64_t shape[2] = {ROWS, COLS};
  dsd_device where = {DSD_DEVICE_CUDA, device};
  dsd_tensor t;
  dsd_error* err = NULL;
  if (dsd_tensor_from_blob(mem.data, DSD_DTYPE_F32, shape, 2, NULL, where, false, give_back, &mem,
                           &t, &err) != DSD_OK)
    return fail_dsd("dsd_tensor_from_blob", err);

  dsd_tensor_info info;
  if (dsd_tensor_info_get(t, &info, &err) != DSD_OK) return fail_dsd("dsd_tensor_info_get", err);
  int bad = 0;
  if (info.data != mem.data) {
    fprintf(stderr, "cuda_from_blob: dsd reports address %p, the buffer is at %p\n", info.data, mem.data);
    bad = 1;
  }
  if (info.device.type != DSD_DEVICE_CUDA || info.device.index != device) {
    fprintf(stderr, "cuda_from_blob: dsd reports device (%d, %d), expected (%d, %d)\n",
            (int)info.device.type, (int)info.device.index, DSD_DEVICE_CUDA, device);
    bad = 1;
  }
  if (info.ndim != 2 || info.nbytes != nbytes || info.dtype != DSD_DTYPE_F32 || info.read_only) {
    fprintf(stderr, "cuda_from_blob: dsd reports ndim %zu, %zu bytes, dtype %d, read_only %d\n",
            (size_t)info.ndim, (size_t)info.nbytes, (int)info.dtype, (int)info.read_only);
    bad = 1;
  }
  if (mem.releases != 0) {
    fprintf(stderr, "cuda_from_blob: the memory was released while dsd still refers to it\n");
    bad = 1;
  }

  /* The bytes are still the program's: nothing was copied or moved. */
  float probe = 0;
  const size_t last = (size_t)ROWS * COLS - 1;
  if ((e = cudaMemcpy(&probe, (const float*)mem.data + last, sizeof probe, cudaMemcpyDeviceToHost)) !=
      cudaSuccess)
    return fail_cuda("cudaMemcpy back", e);
  if (probe != (float)last) {
    fprintf(stderr, "cuda_from_blob: element %zu is %g, expected %g\n", last, probe, (double)last);
    bad = 1;
  }

  if (dsd_tensor_release(t, &err) != DSD_OK) return fail_dsd("dsd_tensor_release", err);
  if (mem.releases != 1) {
    fprintf(stderr, "cuda_from_blob: release callback ran %d times, expected once\n", mem.releases);
    bad = 1;
  }
  /* A released handle is an error code, never a crash. */
  if (dsd_tensor_release(t, &err) == DSD_OK) {
    fprintf(stderr, "cuda_from_blob: releasing a released handle succeeded\n");
    bad = 1;
  } else {
    dsd_error_free(err);
    err = NULL;
  }
  free(host);
  if (!bad) printf("cuda_from_blob: %zu bytes on cuda:%d lent to dsd and given back once\n", nbytes, device);
  return bad;
}

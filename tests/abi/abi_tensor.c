/* Tensor handles through dsd.h only: creation, introspection, DLPack round trips, and every
 * kind of handle misuse (stale, double release, zeroed, wrong kind). */
#include "check.h"

static int releases = 0;
static void count_release(void* user_data) {
  releases++;
  CHECK(user_data == (void*)&releases);
}

int main(void) {
  CHECK((dsd_abi_version() >> 16) == DSD_ABI_VERSION_MAJOR);
  CHECK(strlen(dsd_version_string()) > 0);
  CHECK(dsd_dtype_size(DSD_DTYPE_BF16) == 2);
  CHECK(dsd_dtype_size(99) == 0);
  CHECK(strcmp(dsd_dtype_name(DSD_DTYPE_F8_E4M3FN), "float8_e4m3fn") == 0);
  CHECK(dsd_dtype_name(0) == NULL);
  CHECK(strcmp(dsd_status_name(DSD_E_STALE_HANDLE), "stale_handle") == 0);
  CHECK(strcmp(dsd_status_name(1000), "unknown") == 0);

  float data[6] = {1, 2, 3, 4, 5, 6};
  const int64_t shape[2] = {2, 3};
  const dsd_device cpu = {DSD_DEVICE_CPU, 0};
  dsd_tensor t = {0};
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 2, NULL, cpu, false, count_release,
                                &releases, &t, ERR));
  CHECK(t.bits != 0);

  dsd_tensor_info info;
  CHECK_OK(dsd_tensor_info_get(t, &info, ERR));
  CHECK(info.dtype == DSD_DTYPE_F32 && info.ndim == 2 && info.numel == 6 && info.nbytes == 24);
  CHECK(info.data == data && info.contiguous && !info.read_only);
  CHECK(info.device.type == DSD_DEVICE_CPU);

  int64_t dims[2];
  CHECK_OK(dsd_tensor_shape(t, dims, 2, ERR));
  CHECK(dims[0] == 2 && dims[1] == 3);
  CHECK_OK(dsd_tensor_strides(t, dims, 2, ERR));
  CHECK(dims[0] == 3 && dims[1] == 1);
  EXPECT_ERROR(DSD_E_BUFFER_TOO_SMALL, "needs room for 2", dsd_tensor_shape(t, dims, 1, ERR));

  /* A second handle to the same tensor outlives the first. */
  dsd_tensor t2 = {0};
  CHECK_OK(dsd_tensor_retain(t, &t2, ERR));
  CHECK(t2.bits != t.bits);
  CHECK_OK(dsd_tensor_release(t, ERR));
  CHECK(releases == 0);

  /* Misuse of the released handle: errors, never UB. */
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "stale", dsd_tensor_info_get(t, &info, ERR));
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "stale", dsd_tensor_release(t, ERR));  /* double release */
  dsd_tensor zero = {0};
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "zero", dsd_tensor_info_get(zero, &info, ERR));
  dsd_tensor other_kind = {t2.bits ^ (3ull << 56)}; /* kind bits say "layout" */
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a tensor handle", dsd_tensor_info_get(other_kind, &info, ERR));
  dsd_tensor forged = {t2.bits + 12345};
  EXPECT_ERROR(DSD_E_STALE_HANDLE, NULL, dsd_tensor_info_get(forged, &info, ERR));

  /* A reused slot does not revive an old handle. */
  dsd_tensor t3 = {0};
  CHECK_OK(dsd_tensor_retain(t2, &t3, ERR));
  EXPECT_ERROR(DSD_E_STALE_HANDLE, NULL, dsd_tensor_info_get(t, &info, ERR));

  /* DLPack round trip: export, import the export, same memory. */
  struct DLManagedTensorVersioned* v1 = NULL;
  CHECK_OK(dsd_tensor_to_dlpack_versioned(t2, &v1, ERR));
  dsd_tensor back = {0};
  CHECK_OK(dsd_tensor_from_dlpack_versioned(v1, &back, ERR));
  CHECK_OK(dsd_tensor_info_get(back, &info, ERR));
  CHECK(info.data == data);
  struct DLManagedTensor* v0 = NULL;
  CHECK_OK(dsd_tensor_to_dlpack(back, &v0, ERR));
  dsd_dlpack_free(v0); /* an export nobody imported */
  dsd_dlpack_free(NULL);
  dsd_dlpack_versioned_free(NULL);

  CHECK_OK(dsd_tensor_release(t2, ERR));
  CHECK_OK(dsd_tensor_release(t3, ERR));
  CHECK(releases == 0); /* `back` still refers to the memory */
  CHECK_OK(dsd_tensor_release(back, ERR));
  CHECK(releases == 1);

  /* Bad descriptions fail, and the release callback still runs exactly once. */
  const int64_t bad_shape[2] = {2, -3};
  EXPECT_ERROR(DSD_E_SHAPE_MISMATCH, "negative size",
               dsd_tensor_from_blob(data, DSD_DTYPE_F32, bad_shape, 2, NULL, cpu, false,
                                    count_release, &releases, &t, ERR));
  CHECK(releases == 2);
  EXPECT_ERROR(DSD_E_DTYPE_MISMATCH, "unknown dtype",
               dsd_tensor_from_blob(data, 77, shape, 2, NULL, cpu, false, count_release, &releases, &t, ERR));
  CHECK(releases == 3);
  const int64_t neg_strides[2] = {3, -1};
  EXPECT_ERROR(DSD_E_UNSUPPORTED, "negative stride",
               dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 2, neg_strides, cpu, false, NULL, NULL, &t, ERR));
  const dsd_device gpu = {DSD_DEVICE_CUDA, 0};
  dsd_error* err = NULL;
  dsd_status st = dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 2, NULL, gpu, false, NULL, NULL, &t, &err);
  if (st != DSD_OK) {
    CHECK(st == DSD_E_DEVICE);
    CHECK(strstr(dsd_error_message(err), "without CUDA") != NULL);
    dsd_error_free(err);
  } else {
    CHECK_OK(dsd_tensor_release(t, ERR));
  }
  const dsd_device tpu = {42, 0};
  EXPECT_ERROR(DSD_E_DEVICE, "device type", dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 2, NULL, tpu, false, NULL, NULL, &t, ERR));

  /* Read-only memory stays read-only through DLPack. */
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 2, NULL, cpu, true, NULL, NULL, &t, ERR));
  CHECK_OK(dsd_tensor_to_dlpack_versioned(t, &v1, ERR));
  CHECK_OK(dsd_tensor_from_dlpack_versioned(v1, &back, ERR));
  CHECK_OK(dsd_tensor_info_get(back, &info, ERR));
  CHECK(info.read_only);
  CHECK_OK(dsd_tensor_release(back, ERR));
  CHECK_OK(dsd_tensor_release(t, ERR));

  /* A failing call with err == NULL still returns its status, and sets the last error. */
  CHECK(dsd_tensor_release(t, NULL) == DSD_E_STALE_HANDLE);
  CHECK(strstr(dsd_error_last_message(), "stale") != NULL);
  CHECK_DONE();
}

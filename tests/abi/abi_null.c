/* NULL for every pointer argument: an error code and a message naming the argument, never a
 * crash; err == NULL is allowed everywhere; _free(NULL) is a no-op. (tests/abi/test_null_sweep.py
 * repeats this for every function the header declares, argument by argument.) */
#include "check.h"

int main(void) {
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));
  dsd_tensor t = {0};
  float x = 1;
  const int64_t one = 1;
  CHECK_OK(dsd_tensor_from_blob(&x, DSD_DTYPE_F32, &one, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                false, NULL, NULL, &t, ERR));
  size_t n;
  dsd_kind kind;
  const char* s;
  int64_t i64;

  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_state_dict_new(NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_state_dict_new_list(false, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "sd is NULL", dsd_state_dict_size(NULL, &n, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_state_dict_size(sd, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "key is NULL", dsd_state_dict_find(sd, NULL, &n, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "sd is NULL", dsd_state_dict_kind(NULL, 0, &kind, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "sd is NULL", dsd_state_dict_key(NULL, 0, &s, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "sd is NULL", dsd_state_dict_get_int(NULL, 0, &i64, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "sd is NULL", dsd_state_dict_set_int(NULL, "k", 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "data is NULL", dsd_state_dict_set_string(sd, "k", NULL, 3, ERR));
  CHECK_OK(dsd_state_dict_set_string(sd, "k", NULL, 0, ERR)); /* empty string */
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "child is NULL", dsd_state_dict_set_child(sd, "c", NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out_flat is NULL", dsd_state_dict_flatten(sd, NULL, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_tensor_info_get(t, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_tensor_shape(t, NULL, 4, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_tensor_to_dlpack(t, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_tensor_to_dlpack_versioned(t, NULL, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "src is NULL", dsd_tensor_from_dlpack(NULL, &t, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "src is NULL", dsd_tensor_from_dlpack_versioned(NULL, &t, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "shape is NULL",
               dsd_tensor_from_blob(&x, DSD_DTYPE_F32, NULL, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                    false, NULL, NULL, &t, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "data is NULL",
               dsd_tensor_from_blob(NULL, DSD_DTYPE_F32, &one, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                    false, NULL, NULL, &t, ERR));
  /* No elements, no data: fine. */
  const int64_t zero = 0;
  dsd_tensor empty;
  CHECK_OK(dsd_tensor_from_blob(NULL, DSD_DTYPE_F32, &zero, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                false, NULL, NULL, &empty, ERR));
  CHECK_OK(dsd_tensor_release(empty, ERR));

  /* err == NULL: the status alone. */
  CHECK(dsd_state_dict_size(NULL, &n, NULL) == DSD_E_INVALID_ARGUMENT);
  /* NULL error objects read as empty. */
  CHECK(dsd_error_code(NULL) == DSD_E_INVALID_ARGUMENT);
  CHECK(strcmp(dsd_error_message(NULL), "") == 0);
  CHECK(strcmp(dsd_error_context(NULL), "") == 0);
  /* Releasing, retaining or freeing NULL: no-ops for every root. */
  dsd_error_free(NULL);
  dsd_state_dict_release(NULL);
  dsd_comm_release(NULL);
  dsd_mesh_release(NULL);
  CHECK(dsd_state_dict_retain(NULL) == NULL);
  CHECK(dsd_comm_retain(NULL) == NULL);
  CHECK(dsd_mesh_retain(NULL) == NULL);
  dsd_model_free(NULL);
  dsd_optim_free(NULL);
  dsd_incompatible_keys_free(NULL);
  dsd_future_free(NULL);
  dsd_async_checkpointer_free(NULL);
  dsd_checkpoint_manager_free(NULL);
  /* The outputs the header documents as optional. */
  bool equal = false;
  CHECK_OK(dsd_state_dict_equal(sd, sd, &equal, NULL, ERR));
  CHECK(equal);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out_equal is NULL", dsd_state_dict_equal(sd, sd, NULL, NULL, ERR));
  CHECK_OK(dsd_state_dict_container_kind(sd, &kind, NULL, ERR));
  CHECK(kind == DSD_KIND_DICT);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out is NULL", dsd_async_checkpointer_new(NULL, NULL, ERR));

  CHECK_OK(dsd_tensor_release(t, ERR));
  dsd_state_dict_release(sd);
  CHECK_DONE();
}

/* State dicts through dsd.h only: every value kind in and out, nesting, lists and tuples,
 * int-keyed dicts, flatten/unflatten, and the errors of misuse. */
#include "check.h"

static size_t find(const dsd_state_dict* sd, const char* key) {
  size_t i = (size_t)-1;
  CHECK_OK(dsd_state_dict_find(sd, key, &i, ERR));
  return i;
}

int main(void) {
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));

  double w[4] = {0.5, 1.5, 2.5, 3.5};
  const int64_t shape[1] = {4};
  dsd_tensor t;
  CHECK_OK(dsd_tensor_from_blob(w, DSD_DTYPE_F64, 1, shape, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                false, NULL, NULL, &t, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(sd, "l.weight", t, ERR));
  CHECK_OK(dsd_tensor_release(t, ERR)); /* the state dict keeps its own reference */
  CHECK_OK(dsd_state_dict_set_int(sd, "step", 3, ERR));
  CHECK_OK(dsd_state_dict_set_double(sd, "lr", 0.125, ERR));
  CHECK_OK(dsd_state_dict_set_bool(sd, "amsgrad", false, ERR));
  CHECK_OK(dsd_state_dict_set_string(sd, "name", "adam", 4, ERR));
  CHECK_OK(dsd_state_dict_set_bytes(sd, "blob", "\0\1\2", 3, ERR));
  CHECK_OK(dsd_state_dict_set_none(sd, "foreach", ERR));

  dsd_state_dict* betas = NULL;
  CHECK_OK(dsd_state_dict_new_list(true, &betas, ERR));
  CHECK_OK(dsd_state_dict_set_double(betas, NULL, 0.9, ERR));
  CHECK_OK(dsd_state_dict_set_double(betas, NULL, 0.999, ERR));
  CHECK_OK(dsd_state_dict_set_child(sd, "betas", betas, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "for a list", dsd_state_dict_set_int(betas, "k", 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "needs a key", dsd_state_dict_set_int(sd, NULL, 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "inside itself", dsd_state_dict_set_child(betas, NULL, betas, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "inside itself", dsd_state_dict_set_child(betas, NULL, sd, ERR));
  dsd_state_dict_free(betas);

  /* Replacing keeps the position. */
  CHECK_OK(dsd_state_dict_set_int(sd, "step", 4, ERR));
  size_t n = 0;
  CHECK_OK(dsd_state_dict_size(sd, &n, ERR));
  CHECK(n == 8);
  const char* key = NULL;
  CHECK_OK(dsd_state_dict_key(sd, 1, &key, ERR));
  CHECK(strcmp(key, "step") == 0);

  /* Reading back, by kind. */
  dsd_kind kind;
  int64_t i64 = 0;
  CHECK_OK(dsd_state_dict_get_int(sd, find(sd, "step"), &i64, ERR));
  CHECK(i64 == 4);
  double d = 0;
  CHECK_OK(dsd_state_dict_get_double(sd, find(sd, "lr"), &d, ERR));
  CHECK(d == 0.125);
  EXPECT_ERROR(DSD_E_WRONG_KIND, "'step' is a int, not a double",
               dsd_state_dict_get_double(sd, find(sd, "step"), &d, ERR));
  bool b = true;
  CHECK_OK(dsd_state_dict_get_bool(sd, find(sd, "amsgrad"), &b, ERR));
  CHECK(!b);
  const char* s = NULL;
  size_t len = 0;
  CHECK_OK(dsd_state_dict_get_string(sd, find(sd, "name"), &s, &len, ERR));
  CHECK(len == 4 && strcmp(s, "adam") == 0);
  const void* bytes = NULL;
  CHECK_OK(dsd_state_dict_get_bytes(sd, find(sd, "blob"), &bytes, &len, ERR));
  CHECK(len == 3 && memcmp(bytes, "\0\1\2", 3) == 0);
  CHECK_OK(dsd_state_dict_kind(sd, find(sd, "foreach"), &kind, ERR));
  CHECK(kind == DSD_KIND_NONE);

  dsd_tensor got;
  CHECK_OK(dsd_state_dict_get_tensor(sd, find(sd, "l.weight"), &got, ERR));
  dsd_tensor_info info;
  CHECK_OK(dsd_tensor_info_get(got, &info, ERR));
  CHECK(info.data == w && info.dtype == DSD_DTYPE_F64);
  CHECK_OK(dsd_tensor_release(got, ERR));

  dsd_state_dict* child = NULL;
  CHECK_OK(dsd_state_dict_get_child(sd, find(sd, "betas"), &child, ERR));
  bool is_tuple = false;
  CHECK_OK(dsd_state_dict_container_kind(child, &kind, &is_tuple, ERR));
  CHECK(kind == DSD_KIND_LIST && is_tuple);
  CHECK_OK(dsd_state_dict_get_double(child, 1, &d, ERR));
  CHECK(d == 0.999);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out of range", dsd_state_dict_get_double(child, 2, &d, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "not a dict", dsd_state_dict_find(child, "x", &n, ERR));
  /* Reference semantics: writes through the child show in the parent. */
  CHECK_OK(dsd_state_dict_set_double(child, NULL, 1e-8, ERR));
  dsd_state_dict_free(child);
  CHECK_OK(dsd_state_dict_get_child(sd, find(sd, "betas"), &child, ERR));
  CHECK_OK(dsd_state_dict_size(child, &n, ERR));
  CHECK(n == 3);
  dsd_state_dict_free(child);

  EXPECT_ERROR(DSD_E_NOT_FOUND, "'missing'", dsd_state_dict_find(sd, "missing", &n, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "not a dict or list", dsd_state_dict_get_child(sd, 0, &child, ERR));

  /* Int-keyed dicts (positional optimizer state). */
  dsd_state_dict* state = NULL;
  CHECK_OK(dsd_state_dict_new(&state, ERR));
  CHECK_OK(dsd_state_dict_set_int_keys(state, true, ERR));
  CHECK_OK(dsd_state_dict_set_int(state, "0", 1, ERR));
  CHECK_OK(dsd_state_dict_set_int(state, "-12", 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "not an integer", dsd_state_dict_set_int(state, "01", 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "not an integer", dsd_state_dict_set_int(state, "w", 1, ERR));
  CHECK_OK(dsd_state_dict_set_int_keys(state, false, ERR));
  CHECK_OK(dsd_state_dict_set_int(state, "w", 1, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "'w'", dsd_state_dict_set_int_keys(state, true, ERR));
  dsd_state_dict_free(state);

  /* Flatten and back. */
  dsd_state_dict* outer = NULL;
  CHECK_OK(dsd_state_dict_new(&outer, ERR));
  CHECK_OK(dsd_state_dict_set_child(outer, "optim", sd, ERR));
  dsd_state_dict *flat = NULL, *mapping = NULL, *nested = NULL;
  CHECK_OK(dsd_state_dict_flatten(outer, &flat, &mapping, ERR));
  CHECK_OK(dsd_state_dict_find(flat, "optim.l.weight", &n, ERR));
  CHECK_OK(dsd_state_dict_find(flat, "optim.betas", &n, ERR)); /* a tuple is a leaf */
  CHECK_OK(dsd_state_dict_unflatten(flat, mapping, &nested, ERR));
  bool equal = false;
  char why[128];
  CHECK_OK(dsd_state_dict_equal(outer, nested, &equal, why, sizeof why, ERR));
  CHECK(equal);
  CHECK_OK(dsd_state_dict_set_int(nested, "extra", 1, ERR));
  CHECK_OK(dsd_state_dict_equal(outer, nested, &equal, why, sizeof why, ERR));
  CHECK(!equal && strstr(why, "keys") != NULL);
  CHECK_OK(dsd_state_dict_remove(nested, 1, ERR));
  CHECK_OK(dsd_state_dict_size(nested, &n, ERR));
  CHECK(n == 1);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out of range", dsd_state_dict_remove(nested, 5, ERR));
  dsd_state_dict_free(flat);
  dsd_state_dict_free(mapping);
  dsd_state_dict_free(nested);
  dsd_state_dict_free(outer);
  dsd_state_dict_free(sd);
  dsd_state_dict_free(NULL);
  CHECK_DONE();
}

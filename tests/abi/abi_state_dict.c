/* State dicts through dsd.h only: every value kind in and out, nesting, lists and tuples,
 * int-keyed dicts, flatten/unflatten, equality with its borrowed explanation, reference
 * counting (retain/release), and the errors of misuse. */
#include "check.h"

static size_t find(const dsd_state_dict* sd, const char* key) {
  size_t i = (size_t)-1;
  CHECK_OK(dsd_state_dict_find(sd, key, &i, ERR));
  return i;
}

static int releases = 0;
static void count_release(void* user_data) {
  CHECK(user_data == (void*)&releases);
  releases++;
}

/* Reference counting: a container lives while any reference to it (a handle from _new,
 * _get_child or _retain, or a parent holding it) remains; the tensors it holds are let go
 * (their release callback runs) only when the last one is dropped. */
static void check_reference_counting(void) {
  float data[2] = {1, 2};
  const int64_t shape[1] = {2};
  dsd_tensor t;
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                false, count_release, &releases, &t, ERR));
  dsd_state_dict *parent = NULL, *child = NULL;
  CHECK_OK(dsd_state_dict_new(&parent, ERR));
  CHECK_OK(dsd_state_dict_new(&child, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(child, "w", t, ERR));
  CHECK_OK(dsd_tensor_release(t, ERR)); /* only the child refers to the tensor now */
  CHECK_OK(dsd_state_dict_set_child(parent, "c", child, ERR));
  dsd_state_dict_release(child); /* only the parent refers to the child now */

  /* retain returns its argument and adds a reference. */
  CHECK(dsd_state_dict_retain(parent) == parent);
  dsd_state_dict_release(parent);
  size_t n = 0;
  CHECK_OK(dsd_state_dict_size(parent, &n, ERR)); /* one reference left: still alive */
  CHECK(n == 1);

  /* A child retained outlives its parent's release. */
  dsd_state_dict* got = NULL;
  CHECK_OK(dsd_state_dict_get_child(parent, 0, &got, ERR));
  CHECK(dsd_state_dict_retain(got) == got); /* two references: get_child's and retain's */
  dsd_state_dict_release(parent);
  CHECK(releases == 0);
  dsd_state_dict_release(got);
  CHECK(releases == 0);
  CHECK_OK(dsd_state_dict_size(got, &n, ERR));
  CHECK(n == 1);
  dsd_tensor back;
  CHECK_OK(dsd_state_dict_get_tensor(got, 0, &back, ERR));
  dsd_tensor_info info;
  CHECK_OK(dsd_tensor_info_get(back, &info, ERR));
  CHECK(info.data == (void*)data);
  CHECK_OK(dsd_tensor_release(back, ERR));
  CHECK(releases == 0);
  dsd_state_dict_release(got); /* the last reference: the tensor is let go */
  CHECK(releases == 1);
}

/* dsd_state_dict_equal's *out_why is borrowed from `a`: it stays readable after `b` is gone. */
static void check_equal_why_is_borrowed_from_a(const dsd_state_dict* a) {
  dsd_state_dict* b = NULL;
  CHECK_OK(dsd_state_dict_new(&b, ERR));
  CHECK_OK(dsd_state_dict_set_int(b, "only_in_b", 1, ERR));
  bool equal = true;
  const char* why = NULL;
  CHECK_OK(dsd_state_dict_equal(a, b, &equal, &why, ERR));
  dsd_state_dict_release(b);
  CHECK(!equal && why != NULL && why[0] != '\0');
  if (why != NULL) {
    char copy[512];
    snprintf(copy, sizeof copy, "%s", why); /* reading it after b's release is the check */
    CHECK(strlen(copy) > 0);
  }
}

int main(void) {
  check_reference_counting();
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));

  double w[4] = {0.5, 1.5, 2.5, 3.5};
  const int64_t shape[1] = {4};
  dsd_tensor t;
  CHECK_OK(dsd_tensor_from_blob(w, DSD_DTYPE_F64, shape, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
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
  dsd_state_dict_release(betas);

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
  dsd_state_dict_release(child);
  CHECK_OK(dsd_state_dict_get_child(sd, find(sd, "betas"), &child, ERR));
  CHECK_OK(dsd_state_dict_size(child, &n, ERR));
  CHECK(n == 3);
  dsd_state_dict_release(child);

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
  dsd_state_dict_release(state);

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
  const char* why = NULL;
  CHECK_OK(dsd_state_dict_equal(outer, nested, &equal, &why, ERR));
  CHECK(equal && why != NULL && strcmp(why, "") == 0);
  CHECK_OK(dsd_state_dict_set_int(nested, "extra", 1, ERR));
  CHECK_OK(dsd_state_dict_equal(outer, nested, &equal, &why, ERR));
  CHECK(!equal && why != NULL && strstr(why, "keys") != NULL);
  CHECK_OK(dsd_state_dict_equal(outer, nested, &equal, NULL, ERR)); /* out_why is optional */
  CHECK(!equal);
  check_equal_why_is_borrowed_from_a(outer);
  CHECK_OK(dsd_state_dict_remove(nested, 1, ERR));
  CHECK_OK(dsd_state_dict_size(nested, &n, ERR));
  CHECK(n == 1);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out of range", dsd_state_dict_remove(nested, 5, ERR));
  dsd_state_dict_release(flat);
  dsd_state_dict_release(mapping);
  dsd_state_dict_release(nested);
  dsd_state_dict_release(outer);
  dsd_state_dict_release(sd);
  dsd_state_dict_release(NULL);
  CHECK_DONE();
}

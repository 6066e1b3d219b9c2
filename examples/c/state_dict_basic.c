/* A C program that lends dsd its own buffers as tensors, builds a state dict of a tiny
 * linear layer plus some training metadata, and reads everything back.
 *
 *   cc state_dict_basic.c $(pkg-config --cflags --libs dsd)
 */
#include <dsd/dsd.h>

#include <stdio.h>
#include <string.h>

#define TRY(call)                                                                   \
  do {                                                                              \
    dsd_error* err_ = NULL;                                                         \
    dsd_status st_ = (err_slot = &err_, call);                                      \
    if (st_ != DSD_OK) {                                                            \
      fprintf(stderr, "%s failed: %s\n", #call, dsd_error_message(err_));           \
      dsd_error_free(err_);                                                         \
      return 1;                                                                     \
    }                                                                               \
  } while (0)
static dsd_error** err_slot;
#define ERR err_slot

static int released = 0;
static void on_release(void* user_data) { ++*(int*)user_data; }

int main(void) {
  /* The trainer's own memory: a 2x3 weight and a bias. */
  float weight[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  float bias[2] = {-1.0f, 1.0f};
  const int64_t wshape[2] = {2, 3}, bshape[1] = {2};
  const dsd_device cpu = {DSD_DEVICE_CPU, 0};

  dsd_tensor w, b;
  TRY(dsd_tensor_from_blob(weight, DSD_DTYPE_F32, wshape, 2, NULL, cpu, false, on_release, &released, &w, ERR));
  TRY(dsd_tensor_from_blob(bias, DSD_DTYPE_F32, bshape, 1, NULL, cpu, false, on_release, &released, &b, ERR));

  dsd_state_dict* sd;
  TRY(dsd_state_dict_new(&sd, ERR));
  TRY(dsd_state_dict_set_tensor(sd, "linear.weight", w, ERR));
  TRY(dsd_state_dict_set_tensor(sd, "linear.bias", b, ERR));
  TRY(dsd_tensor_release(w, ERR)); /* the state dict holds its own references */
  TRY(dsd_tensor_release(b, ERR));

  dsd_state_dict* meta;
  TRY(dsd_state_dict_new(&meta, ERR));
  TRY(dsd_state_dict_set_int(meta, "step", 100, ERR));
  TRY(dsd_state_dict_set_double(meta, "lr", 3e-4, ERR));
  TRY(dsd_state_dict_set_string(meta, "run", "example", 7, ERR));
  TRY(dsd_state_dict_set_child(sd, "meta", meta, ERR));
  dsd_state_dict_release(meta);

  /* Read it back: keys in order, tensors by handle, pointing at our buffers. */
  size_t n;
  TRY(dsd_state_dict_size(sd, &n, ERR));
  printf("state dict with %zu entries:\n", n);
  for (size_t i = 0; i < n; ++i) {
    const char* key;
    dsd_kind kind;
    TRY(dsd_state_dict_key(sd, i, &key, ERR));
    TRY(dsd_state_dict_kind(sd, i, &kind, ERR));
    if (kind == DSD_KIND_TENSOR) {
      dsd_tensor t;
      dsd_tensor_info info;
      int64_t shape[4];
      TRY(dsd_state_dict_get_tensor(sd, i, &t, ERR));
      TRY(dsd_tensor_info_get(t, &info, ERR));
      TRY(dsd_tensor_shape(t, shape, 4, ERR));
      printf("  %-14s %s [", key, dsd_dtype_name(info.dtype));
      for (size_t d = 0; d < info.ndim; ++d) printf("%s%lld", d ? ", " : "", (long long)shape[d]);
      printf("] at %p (%s)\n", info.data,
             info.data == (void*)weight || info.data == (void*)bias ? "our buffer" : "a copy!");
      if (info.data != (void*)weight && info.data != (void*)bias) return 1;
      TRY(dsd_tensor_release(t, ERR));
    } else if (kind == DSD_KIND_DICT) {
      dsd_state_dict* child;
      int64_t step;
      size_t at;
      TRY(dsd_state_dict_get_child(sd, i, &child, ERR));
      TRY(dsd_state_dict_find(child, "step", &at, ERR));
      TRY(dsd_state_dict_get_int(child, at, &step, ERR));
      printf("  %-14s dict, step = %lld\n", key, (long long)step);
      if (step != 100) return 1;
      dsd_state_dict_release(child);
    }
  }

  /* Flattened view, as DCP stores it. */
  dsd_state_dict *flat, *mapping;
  TRY(dsd_state_dict_flatten(sd, &flat, &mapping, ERR));
  TRY(dsd_state_dict_size(flat, &n, ERR));
  printf("flattened keys:");
  for (size_t i = 0; i < n; ++i) {
    const char* key;
    TRY(dsd_state_dict_key(flat, i, &key, ERR));
    printf(" %s", key);
  }
  printf("\n");
  dsd_state_dict_release(flat);
  dsd_state_dict_release(mapping);

  dsd_state_dict_release(sd);
  printf("buffers released by dsd: %d of 2\n", released);
  return released == 2 ? 0 : 1;
}

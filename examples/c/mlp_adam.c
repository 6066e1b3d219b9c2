/* A two-layer MLP trained with Adam, written in plain C: the trainer owns every buffer
 * (weights, moments, step counters) and registers them with dsd. dsd produces PyTorch-style
 * state dicts (canonical FQNs, optimizer state keyed by FQN), loads them into a second,
 * differently initialised trainer, and both then train one more step to bitwise the same
 * weights. Adam's state is created lazily, through dsd's materialize callback.
 *
 *   cc mlp_adam.c $(pkg-config --cflags --libs dsd) -lm
 */
#include <dsd/dsd.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                 \
  do {                                                                              \
    dsd_error* e_ = NULL;                                                           \
    dsd_status s_ = (err_slot = &e_, call);                                         \
    if (s_ != DSD_OK) {                                                             \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, dsd_error_message(e_)); \
      dsd_error_free(e_);                                                           \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)
static dsd_error** err_slot;
#define ERR err_slot

enum { NPARAM = 4 };
static const char* kNames[NPARAM] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
static const int64_t kShapes[NPARAM][2] = {{8, 4}, {8, 1}, {2, 8}, {2, 1}};
static const size_t kNdim[NPARAM] = {2, 1, 2, 1};

typedef struct {
  float* w[NPARAM];       /* parameters */
  float* m[NPARAM];       /* exp_avg, allocated lazily */
  float* v[NPARAM];       /* exp_avg_sq, allocated lazily */
  float step[NPARAM];     /* Adam's step counter, a 0-dim float32 tensor as in PyTorch */
  double lr, beta1, beta2, eps;
  dsd_tensor handle[NPARAM];
  dsd_model* model;
  dsd_optim* optim;
  dsd_state_dict* hyper;
} Trainer;

static int64_t numel(int i) { return kShapes[i][0] * kShapes[i][1]; }

static dsd_tensor wrap(float* data, int i, int scalar) {
  dsd_tensor t;
  const int64_t* shape = kShapes[i];
  CHECK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, scalar ? 0 : kNdim[i], NULL,
                             (dsd_device){DSD_DEVICE_CPU, 0}, false, NULL, NULL, &t, ERR));
  return t;
}

/* dsd calls this before a get or set when parameters lack optimizer state. */
static dsd_status materialize(void* user_data, dsd_optim* optim, const dsd_tensor* params,
                              const size_t* pids, size_t count) {
  (void)pids; /* our parameters are told apart by their memory */
  Trainer* tr = user_data;
  for (size_t k = 0; k < count; ++k) {
    dsd_tensor_info info;
    if (dsd_tensor_info_get(params[k], &info, NULL) != DSD_OK) return DSD_E_CALLBACK;
    for (int i = 0; i < NPARAM; ++i) {
      if (info.data != tr->w[i] || tr->m[i] != NULL) continue;
      tr->m[i] = calloc((size_t)numel(i), sizeof(float));
      tr->v[i] = calloc((size_t)numel(i), sizeof(float));
      tr->step[i] = 0; /* a fresh optimizer's state: nothing stepped */
      dsd_state_dict* st;
      CHECK(dsd_state_dict_new(&st, ERR));
      dsd_tensor step = wrap(&tr->step[i], i, 1), m = wrap(tr->m[i], i, 0), v = wrap(tr->v[i], i, 0);
      CHECK(dsd_state_dict_set_tensor(st, "step", step, ERR));
      CHECK(dsd_state_dict_set_tensor(st, "exp_avg", m, ERR));
      CHECK(dsd_state_dict_set_tensor(st, "exp_avg_sq", v, ERR));
      CHECK(dsd_optim_set_param_state(optim, tr->handle[i], st, ERR));
      dsd_state_dict_release(st);
      dsd_tensor_release(step, NULL);
      dsd_tensor_release(m, NULL);
      dsd_tensor_release(v, NULL);
    }
  }
  return DSD_OK;
}

static void trainer_init(Trainer* tr, unsigned seed) {
  memset(tr, 0, sizeof *tr);
  srand(seed);
  tr->lr = 1e-2, tr->beta1 = 0.9, tr->beta2 = 0.999, tr->eps = 1e-8;
  CHECK(dsd_model_new(NULL, "MLP", &tr->model, ERR));
  CHECK(dsd_optim_new(&tr->optim, ERR));
  for (int i = 0; i < NPARAM; ++i) {
    tr->w[i] = malloc((size_t)numel(i) * sizeof(float));
    for (int64_t j = 0; j < numel(i); ++j) tr->w[i][j] = (float)rand() / (float)RAND_MAX - 0.5f;
    tr->handle[i] = wrap(tr->w[i], i, 0);
    CHECK(dsd_model_add_parameter(tr->model, kNames[i], tr->handle[i], true, ERR));
  }
  CHECK(dsd_state_dict_new(&tr->hyper, ERR));
  dsd_state_dict* betas;
  CHECK(dsd_state_dict_new_list(true, &betas, ERR));
  CHECK(dsd_state_dict_set_double(betas, NULL, tr->beta1, ERR));
  CHECK(dsd_state_dict_set_double(betas, NULL, tr->beta2, ERR));
  CHECK(dsd_state_dict_set_double(tr->hyper, "lr", tr->lr, ERR));
  CHECK(dsd_state_dict_set_child(tr->hyper, "betas", betas, ERR));
  CHECK(dsd_state_dict_set_double(tr->hyper, "eps", tr->eps, ERR));
  CHECK(dsd_state_dict_set_double(tr->hyper, "weight_decay", 0.0, ERR));
  dsd_state_dict_release(betas);
  CHECK(dsd_optim_add_param_group(tr->optim, tr->hyper, tr->handle, NPARAM, ERR));
  CHECK(dsd_optim_set_materialize(tr->optim, materialize, tr, ERR));
}

/* One Adam step on the loss 0.5 * sum((w - target)^2), whose gradient is w - target. */
static void train_step(Trainer* tr, float target) {
  for (int i = 0; i < NPARAM; ++i) {
    if (tr->m[i] == NULL) { /* first step: create state, as a lazy optimizer does */
      const size_t pid = (size_t)i;
      materialize(tr, tr->optim, &tr->handle[i], &pid, 1);
    }
    tr->step[i] += 1;
    const double bc1 = 1 - pow(tr->beta1, tr->step[i]), bc2 = 1 - pow(tr->beta2, tr->step[i]);
    for (int64_t j = 0; j < numel(i); ++j) {
      const float g = tr->w[i][j] - target;
      tr->m[i][j] = (float)(tr->beta1 * tr->m[i][j] + (1 - tr->beta1) * g);
      tr->v[i][j] = (float)(tr->beta2 * tr->v[i][j] + (1 - tr->beta2) * g * g);
      tr->w[i][j] -= (float)(tr->lr * (tr->m[i][j] / bc1) / (sqrt(tr->v[i][j] / bc2) + tr->eps));
    }
  }
}

/* Reads lr back from the (shared) hyperparameter dict after a load. */
static void sync_hyper(Trainer* tr) {
  size_t at;
  CHECK(dsd_state_dict_find(tr->hyper, "lr", &at, ERR));
  CHECK(dsd_state_dict_get_double(tr->hyper, at, &tr->lr, ERR));
}

static void trainer_free(Trainer* tr) {
  dsd_model_free(tr->model);
  dsd_optim_free(tr->optim);
  dsd_state_dict_release(tr->hyper);
  for (int i = 0; i < NPARAM; ++i) {
    dsd_tensor_release(tr->handle[i], NULL);
    free(tr->w[i]);
    free(tr->m[i]);
    free(tr->v[i]);
  }
}

int main(void) {
  Trainer a, b;
  trainer_init(&a, 1);
  trainer_init(&b, 2);
  b.lr = 0.5; /* b has other weights and another learning rate until it loads a's state */
  CHECK(dsd_state_dict_set_double(b.hyper, "lr", b.lr, ERR));

  /* b's optimizer has no state yet: dsd materializes it, no step is taken. */
  dsd_state_dict *lazy_m, *lazy_o;
  CHECK(dsd_get_state_dict(b.model, &b.optim, 1, NULL, &lazy_m, &lazy_o, ERR));
  printf("fresh optimizer: step counters %g %g %g %g (no dummy step)\n", b.step[0], b.step[1], b.step[2], b.step[3]);
  dsd_state_dict_release(lazy_m);
  dsd_state_dict_release(lazy_o);

  for (int s = 0; s < 5; ++s) train_step(&a, 0.25f);

  dsd_state_dict_options opts;
  dsd_state_dict_options_init(&opts);
  opts.flatten_optimizer_state_dict = true;
  dsd_state_dict *msd, *osd;
  CHECK(dsd_get_state_dict(a.model, &a.optim, 1, &opts, &msd, &osd, ERR));
  size_t n;
  CHECK(dsd_state_dict_size(osd, &n, ERR));
  printf("flattened optimizer state dict of trainer a (%zu keys):\n", n);
  for (size_t i = 0; i < n; ++i) {
    const char* key;
    CHECK(dsd_state_dict_key(osd, i, &key, ERR));
    if (strstr(key, "fc1.weight")) printf("  %s\n", key);
  }

  /* Load a's state into b: copied into b's own buffers, hyperparameters into b's dict. */
  dsd_incompatible_keys* keys;
  CHECK(dsd_set_state_dict(b.model, &b.optim, 1, msd, osd, NULL, &keys, ERR));
  size_t missing, unexpected;
  CHECK(dsd_incompatible_keys_count(keys, DSD_KEYS_MISSING, &missing, ERR));
  CHECK(dsd_incompatible_keys_count(keys, DSD_KEYS_UNEXPECTED, &unexpected, ERR));
  dsd_incompatible_keys_free(keys);
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  sync_hyper(&b);
  printf("loaded into trainer b: %zu missing, %zu unexpected keys; lr %g, step %g\n", missing, unexpected,
         b.lr, b.step[0]);

  train_step(&a, 0.25f);
  train_step(&b, 0.25f);
  int same = 1;
  for (int i = 0; i < NPARAM; ++i) same &= memcmp(a.w[i], b.w[i], (size_t)numel(i) * sizeof(float)) == 0;
  printf("after one more step, trainers a and b have %s weights\n", same ? "bitwise identical" : "DIFFERENT");
  trainer_free(&a);
  trainer_free(&b);
  return same ? 0 : 1;
}

/* The C ABI calls of bindings/julia/examples/train_mlp.jl, made in the same order with the
 * same arguments, against the real library: what the Julia example does to dsd is proven
 * here, where no Julia runs. Each block is labelled as in the example ("[block B]"), with
 * the Julia lines it translates; check_binding.py checks that both files name the same
 * blocks. Only the arithmetic differs: the example back-propagates through the MLP, this
 * program uses the gradient of 0.5 * |w - 0.25|^2 (the ABI calls do not depend on it).
 *
 * What it checks, beyond every call succeeding:
 * - tensors from memory laid out as Julia lays out an Array (column-major), described to dsd
 *   with the reversed shape and strides: the state dict shows PyTorch's shapes (fc1.weight
 *   is (8, 4) for a Julia (4, 8) matrix) and aliases the trainer's memory;
 * - release callbacks: none runs while dsd still refers to the memory (a Julia array unpinned
 *   early could be collected under dsd), each runs exactly once, and all have run once the
 *   trainer, the manager and the communicator are closed (Julia's pinned table is empty);
 * - every `*err` passed is a fresh NULL (the ABI refuses anything else), and the TIMEOUT
 *   error objects of the polling wait are freed;
 * - the fresh trainer holds, after load_latest + set_state_dict, bitwise the weights, Adam
 *   moments, step counters and learning rates of the trained one.
 */
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700

#include <ftw.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dsd/dsd.h"

static int failures = 0;

/* Julia's `checked(L.f, args...)`: a fresh NULL error slot for every call; throws on failure. */
#define CALL(call)                                                                         \
  do {                                                                                     \
    dsd_error* e_ = NULL;                                                                  \
    dsd_status s_ = (err_slot = &e_, call);                                                \
    if (s_ != DSD_OK) {                                                                    \
      fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call, dsd_status_name(s_), \
              dsd_error_message(e_));                                                      \
      dsd_error_free(e_);                                                                  \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)
static dsd_error** err_slot;
#define ERR err_slot

#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);     \
      failures++;                                                             \
    }                                                                         \
  } while (0)

/* Dsd.jl's pin table: one key per dsd_tensor_from_blob (NEXT_PIN counts from 1), and the
 * number of times dsd's release callback ran for it. */
enum { MAX_PINS = 64 };
static atomic_int released[MAX_PINS + 1];
static uintptr_t next_pin = 0;

static void release_pinned(void* user_data) {
  uintptr_t key = (uintptr_t)user_data;
  if (key == 0 || key > MAX_PINS) {
    fprintf(stderr, "release callback with an unknown key %zu\n", (size_t)key);
    abort();
  }
  atomic_fetch_add(&released[key], 1);
}

/* A Julia Array{Float32,N}: `size` in Julia order, column-major. */
typedef struct {
  float* data;
  int ndim;
  int64_t size[2];
  uintptr_t pin; /* the key of the handle over it */
} JlArray;

static int64_t numel(const JlArray* a) {
  int64_t n = 1;
  for (int d = 0; d < a->ndim; ++d) n *= a->size[d];
  return n;
}

static JlArray jl_array(int ndim, int64_t d1, int64_t d2) {
  JlArray a = {NULL, ndim, {d1, d2}, 0};
  a.data = calloc((size_t)(numel(&a) > 0 ? numel(&a) : 1), sizeof(float));
  return a;
}

/* Dsd.Tensor(A): dsd_tensor_from_blob(pointer(A), dtype, reverse(size(A)), ndims(A),
 * reverse(strides(A)), CPU, read_only = false, RELEASE_CALLBACK, key). */
static dsd_tensor jl_tensor(JlArray* a) {
  int64_t shape[2] = {0, 0}, strides[2] = {0, 0}, jstrides[2] = {1, a->size[0]};
  for (int d = 0; d < a->ndim; ++d) {
    shape[d] = a->size[a->ndim - 1 - d];
    strides[d] = jstrides[a->ndim - 1 - d];
  }
  uintptr_t key = ++next_pin;
  if (key > MAX_PINS) abort();
  a->pin = key;
  dsd_tensor t;
  CALL(dsd_tensor_from_blob(a->data, DSD_DTYPE_F32, shape, (size_t)a->ndim, strides,
                            (dsd_device){DSD_DEVICE_CPU, 0}, false, release_pinned, (void*)key,
                            &t, ERR));
  return t;
}

enum { NPARAM = 4, N_IN = 4, N_HIDDEN = 8, N_OUT = 2, STEPS = 20, SAVE_EVERY = 5 };
static const char* kNames[NPARAM] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};

typedef struct {
  JlArray w[NPARAM], m[NPARAM], v[NPARAM], step[NPARAM];
  dsd_tensor handle[NPARAM]; /* Model.tensors */
  dsd_model* model;
  dsd_optim* opt;
  dsd_state_dict* groups[2];
  double lr[2];
} Trainer;

/* init(dims, seed) = reshape(Float32.(0.5 .* sin.(seed .* (1:prod(dims)) .+ 0.1)), dims) */
static void init(JlArray* a, int seed) {
  for (int64_t i = 0; i < numel(a); ++i) a->data[i] = (float)(0.5 * sin(seed * (double)(i + 1) + 0.1));
}

/* add_param_group!(opt, names; lr, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.0) */
static dsd_state_dict* param_group(Trainer* t, int first, double lr) {
  dsd_state_dict *g, *betas;
  CALL(dsd_state_dict_new(&g, ERR));                         /* StateDict(pairs...) */
  CALL(dsd_state_dict_set_double(g, "lr", lr, ERR));
  CALL(dsd_state_dict_new_list(true, &betas, ERR));          /* _container(::Tuple) */
  CALL(dsd_state_dict_set_double(betas, NULL, 0.9, ERR));
  CALL(dsd_state_dict_set_double(betas, NULL, 0.999, ERR));
  CALL(dsd_state_dict_set_child(g, "betas", betas, ERR));
  dsd_state_dict_release(betas);                              /* close(child) */
  CALL(dsd_state_dict_set_double(g, "eps", 1e-8, ERR));
  CALL(dsd_state_dict_set_double(g, "weight_decay", 0.0, ERR));
  const dsd_tensor handles[2] = {t->handle[first], t->handle[first + 1]};
  CALL(dsd_optim_add_param_group(t->opt, g, handles, 2, ERR));
  return g; /* kept in opt.groups */
}

/* [block B: tensors, model, optimizer, param groups, state]
 *   model = Dsd.Model(comm, (p.name => p.w for p in ps)...; class_name = "MLP")
 *   opt = Dsd.Optimizer(model)
 *   g1 = Dsd.add_param_group!(opt, ["fc1.weight", "fc1.bias"]; lr = lr, betas = ..., ...)
 *   g2 = Dsd.add_param_group!(opt, ["fc2.weight", "fc2.bias"]; lr = lr / 2, ...)
 *   for p in ps: Dsd.set_param_state!(opt, p.name, "step" => p.step, "exp_avg" => p.m,
 *                                     "exp_avg_sq" => p.v) */
static void trainer_new(Trainer* t, dsd_comm* comm, int seed, double lr) {
  memset(t, 0, sizeof *t);
  const int64_t sizes[NPARAM][2] = {{N_IN, N_HIDDEN}, {N_HIDDEN, 0}, {N_HIDDEN, N_OUT}, {N_OUT, 0}};
  for (int i = 0; i < NPARAM; ++i) {
    const int ndim = sizes[i][1] ? 2 : 1;
    t->w[i] = jl_array(ndim, sizes[i][0], sizes[i][1]);
    t->m[i] = jl_array(ndim, sizes[i][0], sizes[i][1]);   /* zero(w) */
    t->v[i] = jl_array(ndim, sizes[i][0], sizes[i][1]);
    t->step[i] = jl_array(0, 0, 0);                        /* fill(0.0f0): 0-dimensional */
    init(&t->w[i], seed + i);
  }
  CALL(dsd_model_new(comm, "MLP", &t->model, ERR));
  for (int i = 0; i < NPARAM; ++i) {                       /* add_parameter! -> _own(A) */
    t->handle[i] = jl_tensor(&t->w[i]);
    CALL(dsd_model_add_parameter(t->model, kNames[i], t->handle[i], true, ERR));
  }
  CALL(dsd_optim_new(&t->opt, ERR));
  t->lr[0] = lr, t->lr[1] = lr / 2;
  t->groups[0] = param_group(t, 0, lr);
  t->groups[1] = param_group(t, 2, lr / 2);
  for (int i = 0; i < NPARAM; ++i) {
    dsd_state_dict* st;
    CALL(dsd_state_dict_new(&st, ERR));
    JlArray* values[3] = {&t->step[i], &t->m[i], &t->v[i]};
    const char* keys[3] = {"step", "exp_avg", "exp_avg_sq"};
    for (int k = 0; k < 3; ++k) {                          /* _set!(sd, key, ::AbstractArray) */
      dsd_tensor h = jl_tensor(values[k]);
      CALL(dsd_state_dict_set_tensor(st, keys[k], h, ERR));
      CALL(dsd_tensor_release(h, ERR));                    /* close(t) */
    }
    CALL(dsd_optim_set_param_state(t->opt, t->handle[i], st, ERR));
    dsd_state_dict_release(st);                            /* close(st) */
  }
}

/* adam_step!(t, grads) with the gradient w - 0.25. */
static void adam_step(Trainer* t) {
  const double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  for (int i = 0; i < NPARAM; ++i) {
    const double lr = t->lr[i < 2 ? 0 : 1];
    float* step = t->step[i].data;
    *step += 1;
    const double bc1 = 1 - pow(beta1, *step), bc2 = 1 - pow(beta2, *step);
    for (int64_t j = 0; j < numel(&t->w[i]); ++j) {
      const float g = t->w[i].data[j] - 0.25f;
      float* m = &t->m[i].data[j];
      float* v = &t->v[i].data[j];
      *m = (float)(beta1 * *m + (1 - beta1) * g);
      *v = (float)(beta2 * *v + (1 - beta2) * g * g);
      t->w[i].data[j] -= (float)(lr * (*m / bc1) / (sqrt(*v / bc2) + eps));
    }
  }
}

/* [block C: state dict get]
 *   msd, osd = Dsd.get_state_dict(t.model, t.opt)
 *   state = Dsd.StateDict("model" => msd, "optim" => osd)
 *   close(msd); close(osd) */
static dsd_state_dict* state_of(Trainer* t) {
  dsd_state_dict *msd, *osd, *state;
  CALL(dsd_get_state_dict(t->model, &t->opt, 1, NULL, &msd, &osd, ERR));
  CALL(dsd_state_dict_new(&state, ERR));
  CALL(dsd_state_dict_set_child(state, "model", msd, ERR));
  CALL(dsd_state_dict_set_child(state, "optim", osd, ERR));
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  return state;
}

/* sd[key] for a child container: _find (dsd_state_dict_find), _value_at (kind, get_child). */
static dsd_state_dict* child(dsd_state_dict* sd, const char* key) {
  size_t at;
  dsd_kind kind;
  dsd_state_dict* out;
  CALL(dsd_state_dict_find(sd, key, &at, ERR));
  CALL(dsd_state_dict_kind(sd, at, &kind, ERR));
  EXPECT(kind == DSD_KIND_DICT);
  CALL(dsd_state_dict_get_child(sd, at, &out, ERR));
  return out;
}

/* wait(future::SaveFuture): poll dsd_future_wait(f, 0), freeing each TIMEOUT error object,
 * sleeping `poll` (5 ms) between polls (Julia yields to other tasks there). */
static int wait_future(dsd_future* f) {
  int polls = 0;
  for (;;) {
    dsd_error* e = NULL;
    dsd_status s = dsd_future_wait(f, 0, &e);
    if (s == DSD_OK) {
      EXPECT(e == NULL);
      return polls;
    }
    if (s != DSD_E_TIMEOUT) {
      fprintf(stderr, "async save failed: %s: %s\n", dsd_status_name(s), dsd_error_message(e));
      exit(1);
    }
    dsd_error_free(e);
    ++polls;
    nanosleep(&(struct timespec){0, 5 * 1000 * 1000}, NULL);
  }
}

/* _incompatible_keys(keys): every list counted and read, then freed. */
static size_t read_keys(dsd_incompatible_keys* keys) {
  size_t total = 0;
  const dsd_key_list lists[3] = {DSD_KEYS_MISSING, DSD_KEYS_UNEXPECTED, DSD_KEYS_SKIPPED};
  for (int l = 0; l < 3; ++l) {
    size_t n;
    CALL(dsd_incompatible_keys_count(keys, lists[l], &n, ERR));
    for (size_t i = 0; i < n; ++i) {
      const char* key;
      CALL(dsd_incompatible_keys_key(keys, lists[l], i, &key, ERR));
      fprintf(stderr, "incompatible key (list %d): %s\n", lists[l], key);
    }
    total += n;
  }
  dsd_incompatible_keys_free(keys);
  return total;
}

/* [block F: hyperparameters read back after a load]
 *   sync_hyper!(t::Trainer) = (t.lr .= [g["lr"] for g in t.groups]; t) */
static void sync_hyper(Trainer* t) {
  for (int g = 0; g < 2; ++g) {
    size_t at;
    dsd_kind kind;
    CALL(dsd_state_dict_find(t->groups[g], "lr", &at, ERR));
    CALL(dsd_state_dict_kind(t->groups[g], at, &kind, ERR));
    EXPECT(kind == DSD_KIND_DOUBLE);
    CALL(dsd_state_dict_get_double(t->groups[g], at, &t->lr[g], ERR));
  }
}

/* [block G: teardown]  close(t.opt); close(t.model)
 * where Dsd.jl's close of an Optimizer is dsd_optim_free, then its group dicts released,
 * and close of a Model is dsd_model_free, then the handles of Model.tensors released. */
static void trainer_close(Trainer* t) {
  dsd_optim_free(t->opt);
  for (int g = 0; g < 2; ++g) dsd_state_dict_release(t->groups[g]);
  dsd_model_free(t->model);
  for (int i = 0; i < NPARAM; ++i) CALL(dsd_tensor_release(t->handle[i], ERR));
}

static void trainer_free_memory(Trainer* t) { /* Julia's GC, once unpinned */
  for (int i = 0; i < NPARAM; ++i) {
    free(t->w[i].data), free(t->m[i].data), free(t->v[i].data), free(t->step[i].data);
  }
}

static int bitwise(const JlArray* a, const JlArray* b) {
  return numel(a) == numel(b) &&
         memcmp(a->data, b->data, (size_t)(numel(a) > 0 ? numel(a) : 1) * sizeof(float)) == 0;
}

/* Release counts of a trainer's arrays: all equal to `want`. */
static int all_released(const Trainer* t, int want) {
  int ok = 1;
  for (int i = 0; i < NPARAM; ++i) {
    const JlArray* arrays[4] = {&t->w[i], &t->m[i], &t->v[i], &t->step[i]};
    for (int k = 0; k < 4; ++k) {
      const int n = atomic_load(&released[arrays[k]->pin]);
      if (n != want) {
        fprintf(stderr, "%s array %d: release callback ran %d times, expected %d\n", kNames[i], k,
                n, want);
        ok = 0;
      }
    }
  }
  return ok;
}

static int remove_entry(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

int main(void) {
  /* using Dsd: Dsd.__init__ checks the ABI major version. */
  EXPECT((dsd_abi_version() >> 16) == DSD_ABI_VERSION_MAJOR);

  char root[] = "/tmp/dsd_julia_mlp_XXXXXX"; /* root = mktempdir() */
  if (mkdtemp(root) == NULL) return 1;

  /* [block A: communicator]  Dsd.Communicator() do comm ... end
   *   no launcher variables -> dsd_comm_new_local (with them: dsd_comm_new_from_env) */
  dsd_comm* comm;
  CALL(dsd_comm_new_local(&comm, ERR));
  /*   Dsd.CheckpointManager(comm, root; keep_last = 2) do mgr ... end */
  dsd_checkpoint_manager* mgr;
  CALL(dsd_checkpoint_manager_new(comm, root, 2, &mgr, ERR));

  /*   a = Trainer(comm, 1)   -> [block B] */
  Trainer a, b;
  trainer_new(&a, comm, 1, 1e-2);

  /* The column-major rule, as dsd sees the Julia (4, 8) matrix: PyTorch (8, 4), aliased. */
  {
    int64_t shape[2];
    dsd_tensor_info info;
    CALL(dsd_tensor_shape(a.handle[0], shape, 2, ERR));
    CALL(dsd_tensor_info_get(a.handle[0], &info, ERR));
    EXPECT(shape[0] == N_HIDDEN && shape[1] == N_IN);
    EXPECT(info.data == (void*)a.w[0].data && info.contiguous);
  }

  int async_saves = 0;
  for (int step = 1; step <= STEPS; ++step) {
    adam_step(&a); /* grads, loss = gradients(a, x, y); adam_step!(a, grads) */
    if (step % SAVE_EVERY != 0) continue;
    /* [block D: manager saves] every other save asynchronous
     *   state = state_of(a)                                  -> [block C] */
    dsd_state_dict* state = state_of(&a);
    if (step % (2 * SAVE_EVERY) == 0) {
      /*   future = Dsd.save_async(mgr, state, step); wait(future); close(future) */
      dsd_future* future;
      CALL(dsd_checkpoint_manager_save_async(mgr, state, step, NULL, &future, ERR));
      wait_future(future);
      dsd_future_free(future);
      ++async_saves;
    } else {
      /*   Dsd.save(mgr, state, step) */
      CALL(dsd_checkpoint_manager_save(mgr, state, step, NULL, ERR));
    }
    dsd_state_dict_release(state); /* close(state) */
    int32_t rank;
    CALL(dsd_comm_rank(comm, &rank, ERR)); /* Dsd.rank(comm) == 0 && println(...) */
    EXPECT(rank == 0);
  }
  EXPECT(async_saves == 2);

  /* [block E: resume] a fresh trainer loads the newest checkpoint, in place
   *   b = Trainer(comm, 2; lr = 0.5)                         -> [block B]
   *   state = state_of(b)                                    -> [block C]
   *   resumed = Dsd.load_latest!(mgr, state)
   *   msd, osd = state["model"], state["optim"]
   *   Dsd.set_state_dict(b.model, b.opt; model_state_dict = msd, optim_state_dict = osd)
   *   close(msd); close(osd); close(state) */
  trainer_new(&b, comm, 2, 0.5);
  dsd_state_dict* state = state_of(&b);
  bool found = false;
  int64_t resumed = -1;
  CALL(dsd_checkpoint_manager_load_latest(mgr, state, NULL, &found, &resumed, ERR));
  dsd_state_dict* msd = child(state, "model");
  dsd_state_dict* osd = child(state, "optim");
  dsd_incompatible_keys* keys;
  CALL(dsd_set_state_dict(b.model, &b.opt, 1, msd, osd, NULL, &keys, ERR));
  EXPECT(read_keys(keys) == 0);
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  dsd_state_dict_release(state);
  sync_hyper(&b); /* [block F] */

  /*   ok = resumed == STEPS && same_state(a, b) */
  EXPECT(found && resumed == STEPS);
  for (int i = 0; i < NPARAM; ++i) {
    EXPECT(bitwise(&a.w[i], &b.w[i]));
    EXPECT(bitwise(&a.m[i], &b.m[i]));
    EXPECT(bitwise(&a.v[i], &b.v[i]));
    EXPECT(bitwise(&a.step[i], &b.step[i]));
  }
  EXPECT(a.lr[0] == b.lr[0] && a.lr[1] == b.lr[1] && b.lr[0] == 1e-2);
  EXPECT(a.step[0].data[0] == (float)STEPS);

  /* Nothing was released while the model and optimizer still refer to the memory. */
  EXPECT(all_released(&a, 0));
  EXPECT(all_released(&b, 0));

  /*   close(a); close(b)                                     -> [block G] */
  trainer_close(&a);
  EXPECT(all_released(&a, 1)); /* a's arrays unpinned, b's still lent */
  EXPECT(all_released(&b, 0));
  trainer_close(&b);
  /*   end of the manager's and the communicator's do-blocks */
  dsd_checkpoint_manager_free(mgr);
  dsd_comm_release(comm);

  /*   Dsd.pinned_count() == 0: every release callback ran, exactly once. */
  EXPECT(all_released(&a, 1));
  EXPECT(all_released(&b, 1));
  EXPECT(next_pin == 2 * 4 * NPARAM);
  for (uintptr_t k = 1; k <= next_pin; ++k) EXPECT(atomic_load(&released[k]) == 1);

  trainer_free_memory(&a);
  trainer_free_memory(&b);
  nftw(root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
  if (failures == 0) printf("train_mlp.jl call sequence: ok (resumed at step %lld)\n", (long long)resumed);
  return failures == 0 ? 0 : 1;
}

/* The main job of `./run demo`, in plain C through the dsd C ABI.
 *
 *   dsdrun -n 4 demo_train train  --dir D --steps 30 --save-every 10
 *   dsdrun -n 2 demo_train resume --dir D
 *
 * A small transformer-shaped model (tied embedding/output, attention and feed-forward blocks,
 * norms) is trained with Adam, each rank holding only its shards: at world 4 on a 2 x 2 mesh
 * (dp, tp) with HSDP/TP-style placements (column-parallel weights [Shard(0), Shard(0)],
 * row-parallel ones [Shard(0), Shard(1)], the vocabulary split over tp, norms replicated).
 * Every few steps the sharded model and optimizer state dicts are saved asynchronously through
 * a checkpoint manager over the trainer's communicator, whose own asynchronous checkpointer
 * stages the state in reused host buffers and writes on a background thread; training only
 * waits for the copy. The final full state dict is
 * gathered to rank 0 and kept as a reference.
 *
 * `resume` starts at another world size with another layout (a 1-d mesh, Shard(1)
 * everywhere), loads the newest complete checkpoint with resharding, gathers the full state
 * dict and checks it is bitwise the reference; then trains on.
 *
 * The "training" is elementwise (each weight descends towards a fixed target, Adam with bias
 * correction), so a weight's trajectory depends only on its global position: any layout, any
 * world size computes the same numbers, and bitwise equality after a reshard is meaningful.
 */
#include <dsd/dsd.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static dsd_error** err_slot;
#define ERR err_slot
#define CHECK(call)                                                                       \
  do {                                                                                    \
    dsd_error* e_ = NULL;                                                                 \
    dsd_status s_ = (err_slot = &e_, call);                                               \
    if (s_ != DSD_OK) {                                                                   \
      fprintf(stderr, "[rank %d] %s:%d: %s\n  %s (%s)\n", g_rank, __FILE__, __LINE__, #call, \
              dsd_error_message(e_), dsd_status_name(s_));                                \
      dsd_error_free(e_);                                                                 \
      exit(2);                                                                            \
    }                                                                                     \
  } while (0)

static int g_rank = 0, g_world = 1;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------
 * The model: names, shapes and how each tensor is split. */

enum { VOCAB = 512, DIM = 64, FFN = 256, LAYERS = 2, MAX_PARAMS = 32 };
enum Kind { EMBED, NORM, COLUMN, ROW };

typedef struct {
  char name[64];
  int64_t shape[2];
  int ndim;
  enum Kind kind;
  int tied_to; /* index of the parameter this one shares memory with, or -1 */
} Spec;

static Spec specs[MAX_PARAMS];
static int nspecs = 0;

static void add_spec(const char* name, int64_t rows, int64_t cols, enum Kind kind, int tied_to) {
  Spec* s = &specs[nspecs++];
  snprintf(s->name, sizeof s->name, "%s", name);
  s->shape[0] = rows;
  s->shape[1] = cols;
  s->ndim = cols > 0 ? 2 : 1;
  s->kind = kind;
  s->tied_to = tied_to;
}

static void build_specs(void) {
  char name[64];
  add_spec("tok_embeddings.weight", VOCAB, DIM, EMBED, -1);
  for (int l = 0; l < LAYERS; ++l) {
    const char* col[] = {"attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"};
    snprintf(name, sizeof name, "layers.%d.attention_norm.weight", l);
    add_spec(name, DIM, 0, NORM, -1);
    for (int k = 0; k < 5; ++k) {
      snprintf(name, sizeof name, "layers.%d.%s.weight", l, col[k]);
      add_spec(name, k < 3 ? DIM : FFN, DIM, COLUMN, -1);
    }
    snprintf(name, sizeof name, "layers.%d.attention.wo.weight", l);
    add_spec(name, DIM, DIM, ROW, -1);
    snprintf(name, sizeof name, "layers.%d.ffn_norm.weight", l);
    add_spec(name, DIM, 0, NORM, -1);
    snprintf(name, sizeof name, "layers.%d.feed_forward.w2.weight", l);
    add_spec(name, DIM, FFN, ROW, -1);
  }
  add_spec("norm.weight", DIM, 0, NORM, -1);
  add_spec("output.weight", VOCAB, DIM, EMBED, 0); /* tied to the embedding */
}

/* The placements of a parameter: HSDP/TP on a 2 x 2 mesh at world 4, Shard(1) (Shard(0) for
 * vectors) on a 1-d mesh otherwise. */
static size_t placements_for(const Spec* s, int mesh_ndim, dsd_placement* out) {
  const dsd_placement R = {DSD_PLACEMENT_REPLICATE, 0}, S0 = {DSD_PLACEMENT_SHARD, 0},
                      S1 = {DSD_PLACEMENT_SHARD, 1};
  if (mesh_ndim == 2) {
    switch (s->kind) {
      case EMBED: out[0] = R, out[1] = S0; break;
      case NORM: out[0] = R, out[1] = R; break;
      case COLUMN: out[0] = S0, out[1] = S0; break;
      case ROW: out[0] = S0, out[1] = S1; break;
    }
    return 2;
  }
  out[0] = s->ndim == 2 ? S1 : S0;
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * A trainer's state: its own buffers, lent to dsd. */

typedef struct {
  float *w, *m, *v;     /* this rank's shard of the weight and of Adam's moments */
  float step;           /* Adam's step counter, a 0-d tensor as PyTorch keeps it */
  int64_t offsets[2], sizes[2], numel;
  dsd_layout layout;
  dsd_tensor hw, hm, hv, hstep; /* dist tensor handles (hw: weight, with layout) */
} Param;

typedef struct {
  dsd_comm* comm;
  dsd_mesh* mesh;
  Param p[MAX_PARAMS];
  dsd_model* model;
  dsd_optim* optim;
  dsd_state_dict* hyper;
  double lr, beta1, beta2, eps;
} Trainer;

static float initial_value(int k, int64_t gi) { return 0.1f * (float)cos(0.37 * (double)gi + k); }
static float target_value(int k, int64_t gi) { return (float)sin(0.001 * (double)gi + 0.5 * k); }

static dsd_tensor wrap(float* data, const int64_t* shape, size_t ndim) {
  dsd_tensor t;
  CHECK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, ndim, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                             false, NULL, NULL, &t, ERR));
  return t;
}

static dsd_tensor dist(dsd_tensor local, dsd_layout layout) {
  dsd_tensor t;
  CHECK(dsd_tensor_new_dist(local, layout, &t, ERR));
  CHECK(dsd_tensor_release(local, ERR));
  return t;
}

static void trainer_init(Trainer* tr, int init_weights) {
  memset(tr, 0, sizeof *tr);
  tr->lr = 1e-2, tr->beta1 = 0.9, tr->beta2 = 0.999, tr->eps = 1e-8;
  dsd_comm_options co;
  dsd_comm_options_init(&co);
  co.timeout_ms = 120000;
  CHECK(dsd_comm_new_from_env(&co, &tr->comm, ERR));
  int32_t r, n;
  CHECK(dsd_comm_rank(tr->comm, &r, ERR));
  CHECK(dsd_comm_size(tr->comm, &n, ERR));
  g_rank = r, g_world = n;
  const int mesh_ndim = g_world == 4 ? 2 : 1;
  const int64_t mesh2[2] = {2, 2}, mesh1[1] = {g_world};
  CHECK(dsd_mesh_new(tr->comm, mesh_ndim == 2 ? mesh2 : mesh1, (size_t)mesh_ndim, NULL, 0, DSD_DEVICE_CPU,
                     &tr->mesh, ERR));
  CHECK(dsd_model_new(tr->comm, "Transformer", &tr->model, ERR));
  CHECK(dsd_optim_new(&tr->optim, ERR));
  dsd_tensor group[MAX_PARAMS];
  int ngroup = 0;
  for (int k = 0; k < nspecs; ++k) {
    const Spec* s = &specs[k];
    Param* p = &tr->p[k];
    if (s->tied_to >= 0) { /* the same memory under a second name */
      *p = tr->p[s->tied_to];
      CHECK(dsd_model_add_parameter(tr->model, s->name, p->hw, true, ERR));
      continue;
    }
    dsd_placement pl[2];
    const size_t npl = placements_for(s, mesh_ndim, pl);
    CHECK(dsd_layout_new_placements(tr->mesh, s->shape, (size_t)s->ndim, pl, npl, &p->layout, ERR));
    CHECK(dsd_layout_local_chunk(p->layout, p->offsets, p->sizes, 2, ERR));
    if (s->ndim == 1) p->offsets[1] = 0, p->sizes[1] = 1;
    p->numel = p->sizes[0] * p->sizes[1];
    p->w = calloc((size_t)p->numel + 1, sizeof(float));
    p->m = calloc((size_t)p->numel + 1, sizeof(float));
    p->v = calloc((size_t)p->numel + 1, sizeof(float));
    const int64_t cols = s->ndim == 2 ? s->shape[1] : 1;
    if (init_weights) {
      for (int64_t i = 0; i < p->sizes[0]; ++i)
        for (int64_t j = 0; j < p->sizes[1]; ++j)
          p->w[i * p->sizes[1] + j] = initial_value(k, (p->offsets[0] + i) * cols + p->offsets[1] + j);
    }
    p->hw = dist(wrap(p->w, p->sizes, (size_t)s->ndim), p->layout);
    p->hm = dist(wrap(p->m, p->sizes, (size_t)s->ndim), p->layout);
    p->hv = dist(wrap(p->v, p->sizes, (size_t)s->ndim), p->layout);
    p->hstep = wrap(&p->step, p->sizes, 0);
    CHECK(dsd_model_add_parameter(tr->model, s->name, p->hw, true, ERR));
    group[ngroup++] = p->hw;
  }
  /* One Adam param group with PyTorch's hyperparameter names, and per-parameter state. */
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
  CHECK(dsd_optim_add_param_group(tr->optim, tr->hyper, group, (size_t)ngroup, ERR));
  for (int k = 0; k < nspecs; ++k) {
    if (specs[k].tied_to >= 0) continue;
    Param* p = &tr->p[k];
    dsd_state_dict* st;
    CHECK(dsd_state_dict_new(&st, ERR));
    CHECK(dsd_state_dict_set_tensor(st, "step", p->hstep, ERR));
    CHECK(dsd_state_dict_set_tensor(st, "exp_avg", p->hm, ERR));
    CHECK(dsd_state_dict_set_tensor(st, "exp_avg_sq", p->hv, ERR));
    CHECK(dsd_optim_set_param_state(tr->optim, p->hw, st, ERR));
    dsd_state_dict_release(st);
  }
}

/* Releases everything trainer_init made: handles, the registries, then the trainer's buffers
 * (dsd no longer refers to them once the last handle and registry are gone). */
static void trainer_free(Trainer* tr) {
  for (int k = 0; k < nspecs; ++k) {
    if (specs[k].tied_to >= 0) continue; /* shares the handles of the parameter it is tied to */
    Param* p = &tr->p[k];
    CHECK(dsd_tensor_release(p->hw, ERR));
    CHECK(dsd_tensor_release(p->hm, ERR));
    CHECK(dsd_tensor_release(p->hv, ERR));
    CHECK(dsd_tensor_release(p->hstep, ERR));
    CHECK(dsd_layout_release(p->layout, ERR));
  }
  dsd_optim_free(tr->optim);
  dsd_model_free(tr->model);
  dsd_state_dict_release(tr->hyper);
  dsd_mesh_release(tr->mesh);
  dsd_comm_release(tr->comm);
  for (int k = 0; k < nspecs; ++k) {
    if (specs[k].tied_to >= 0) continue;
    free(tr->p[k].w), free(tr->p[k].m), free(tr->p[k].v);
  }
}

static void train_step(Trainer* tr) {
  for (int k = 0; k < nspecs; ++k) {
    const Spec* s = &specs[k];
    if (s->tied_to >= 0) continue;
    Param* p = &tr->p[k];
    p->step += 1;
    const double bc1 = 1 - pow(tr->beta1, p->step), bc2 = 1 - pow(tr->beta2, p->step);
    const int64_t cols = s->ndim == 2 ? s->shape[1] : 1;
    for (int64_t i = 0; i < p->sizes[0]; ++i) {
      for (int64_t j = 0; j < p->sizes[1]; ++j) {
        const int64_t at = i * p->sizes[1] + j;
        const float g = p->w[at] - target_value(k, (p->offsets[0] + i) * cols + p->offsets[1] + j);
        p->m[at] = (float)(tr->beta1 * p->m[at] + (1 - tr->beta1) * g);
        p->v[at] = (float)(tr->beta2 * p->v[at] + (1 - tr->beta2) * g * g);
        p->w[at] -= (float)(tr->lr * (p->m[at] / bc1) / (sqrt(p->v[at] / bc2) + tr->eps));
      }
    }
  }
}

/* {"model": sharded model state dict, "optim": optimizer state dict, "meta": {"step": n}},
 * tensors aliasing the trainer's buffers. */
static dsd_state_dict* checkpoint_state(Trainer* tr, int64_t step, const dsd_state_dict_options* opts) {
  dsd_state_dict *msd, *osd, *meta, *all;
  CHECK(dsd_get_state_dict(tr->model, &tr->optim, 1, opts, &msd, &osd, ERR));
  CHECK(dsd_state_dict_new(&meta, ERR));
  CHECK(dsd_state_dict_set_int(meta, "step", step, ERR));
  CHECK(dsd_state_dict_new(&all, ERR));
  CHECK(dsd_state_dict_set_child(all, "model", msd, ERR));
  CHECK(dsd_state_dict_set_child(all, "optim", osd, ERR));
  CHECK(dsd_state_dict_set_child(all, "meta", meta, ERR));
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  dsd_state_dict_release(meta);
  return all;
}

static dsd_state_dict* child(dsd_state_dict* sd, const char* key) {
  size_t at;
  dsd_state_dict* c;
  CHECK(dsd_state_dict_find(sd, key, &at, ERR));
  CHECK(dsd_state_dict_get_child(sd, at, &c, ERR));
  return c;
}

static int64_t get_step(dsd_state_dict* all) {
  dsd_state_dict* meta = child(all, "meta");
  size_t at;
  int64_t step;
  CHECK(dsd_state_dict_find(meta, "step", &at, ERR));
  CHECK(dsd_state_dict_get_int(meta, at, &step, ERR));
  dsd_state_dict_release(meta);
  return step;
}

/* The full state dict ({"model", "optim"}), gathered to rank 0 on CPU; empty elsewhere. */
static dsd_state_dict* full_state(Trainer* tr) {
  dsd_state_dict_options o;
  dsd_state_dict_options_init(&o);
  o.full_state_dict = true;
  o.cpu_offload = true;
  dsd_state_dict *msd, *osd, *all;
  CHECK(dsd_get_state_dict(tr->model, &tr->optim, 1, &o, &msd, &osd, ERR));
  CHECK(dsd_state_dict_new(&all, ERR));
  size_t n;
  CHECK(dsd_state_dict_size(msd, &n, ERR));
  if (n > 0) {
    CHECK(dsd_state_dict_set_child(all, "model", msd, ERR));
    CHECK(dsd_state_dict_set_child(all, "optim", osd, ERR));
  }
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  return all;
}

static const char* arg(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 2; i + 1 < argc; ++i)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}

static int do_train(const char* dir, int steps, int every) {
  Trainer tr;
  trainer_init(&tr, 1);
  char root[512], reference[512];
  snprintf(root, sizeof root, "%s/checkpoints", dir);
  snprintf(reference, sizeof reference, "%s/reference", dir);
  /* The manager saves and loads over the trainer's communicator (it keeps a reference), and
   * its asynchronous saves go through its own dsd_async_checkpointer: staging buffers reused
   * from one save to the next, a background thread on a clone of the communicator. */
  dsd_checkpoint_manager* manager;
  CHECK(dsd_checkpoint_manager_new(tr.comm, root, 2, &manager, ERR));
  if (g_rank == 0) {
    printf("training on %d ranks, mesh 2 x 2 (dp, tp): HSDP/TP-style shards, %d parameters\n", g_world, nspecs);
  }
  double blocked = 0, started = now();
  dsd_future* inflight = NULL;
  for (int step = 1; step <= steps; ++step) {
    train_step(&tr);
    if (step % every != 0) continue;
    /* A previous save still writing is waited for first (its staging buffers are reused);
     * with this toy model's fast steps that can happen, so it is timed apart. */
    double waited = 0;
    if (inflight != NULL) {
      const double w = now();
      CHECK(dsd_future_wait(inflight, -1, ERR));
      waited = now() - w;
      dsd_future_free(inflight);
    }
    dsd_state_dict* all = checkpoint_state(&tr, step, NULL);
    const double t = now();
    CHECK(dsd_checkpoint_manager_save_async(manager, all, step, NULL, &inflight, ERR));
    const double staged = now() - t; /* training waits only for the copy into staging buffers */
    blocked += staged;
    dsd_state_dict_release(all);
    if (g_rank == 0) {
      printf("step %3d: async save started: training blocked %.1f ms for the copy (the previous save "
             "needed %.1f ms more)\n", step, 1e3 * staged, 1e3 * waited);
    }
  }
  CHECK(dsd_future_wait(inflight, -1, ERR));
  dsd_future_free(inflight);
  const double total = now() - started;
  bool found;
  int64_t latest;
  CHECK(dsd_checkpoint_manager_latest_step(manager, &found, &latest, ERR));
  dsd_state_dict* full = full_state(&tr);
  if (g_rank == 0) {
    CHECK(dsd_checkpoint_save(NULL, full, reference, NULL, ERR)); /* a single-process save of the full dict */
    printf("trained %d steps in %.2f s (%.1f ms blocked by saves); latest checkpoint: step %lld\n", steps, total,
           1e3 * blocked, (long long)latest);
    printf("rank 0 gathered the full state dict (reference) into %s\n", reference);
  }
  dsd_state_dict_release(full);
  dsd_checkpoint_manager_free(manager);
  trainer_free(&tr);
  return 0;
}

static int do_resume(const char* dir, int more_steps) {
  Trainer tr;
  trainer_init(&tr, 0); /* zeros: everything comes from the checkpoint */
  char root[512], reference[512];
  snprintf(root, sizeof root, "%s/checkpoints", dir);
  snprintf(reference, sizeof reference, "%s/reference", dir);
  dsd_checkpoint_manager* manager;
  CHECK(dsd_checkpoint_manager_new(tr.comm, root, 2, &manager, ERR));
  if (g_rank == 0) printf("resuming on %d ranks, a 1-d mesh with Shard(1) layouts\n", g_world);
  /* Load in place: the state dict's tensors are our buffers, resharded 2 x 2 -> 1-d. */
  dsd_state_dict* all = checkpoint_state(&tr, 0, NULL);
  bool found;
  int64_t step;
  const double t = now();
  CHECK(dsd_checkpoint_manager_load_latest(manager, all, NULL, &found, &step, ERR));
  if (!found) {
    fprintf(stderr, "no complete checkpoint under %s\n", root);
    return 1;
  }
  /* Hyperparameters and the like go back through set_state_dict (tensors: already in place). */
  dsd_state_dict *msd = child(all, "model"), *osd = child(all, "optim");
  CHECK(dsd_set_state_dict(tr.model, &tr.optim, 1, msd, osd, NULL, NULL, ERR));
  size_t at;
  CHECK(dsd_state_dict_find(tr.hyper, "lr", &at, ERR));
  CHECK(dsd_state_dict_get_double(tr.hyper, at, &tr.lr, ERR));
  if (g_rank == 0) {
    printf("loaded step %lld (meta.step = %lld) with resharding in %.2f s\n", (long long)step,
           (long long)get_step(all), now() - t);
  }
  dsd_state_dict_release(msd);
  dsd_state_dict_release(osd);
  dsd_state_dict_release(all);

  int status = 0;
  dsd_state_dict* full = full_state(&tr);
  if (g_rank == 0) {
    dsd_state_dict* ref;
    CHECK(dsd_checkpoint_load_full(reference, NULL, 0, &ref, ERR));
    bool equal;
    const char* why; /* borrowed from `full` */
    CHECK(dsd_state_dict_equal(full, ref, &equal, &why, ERR));
    printf("full state dict after resuming at world %d: %s\n", g_world,
           equal ? "bitwise identical to the one trained at world 4" : why);
    status = equal ? 0 : 1;
    dsd_state_dict_release(ref);
  }
  dsd_state_dict_release(full);
  for (int s = 0; s < more_steps; ++s) train_step(&tr);
  if (g_rank == 0 && more_steps > 0) printf("trained %d more steps at world %d\n", more_steps, g_world);
  dsd_checkpoint_manager_free(manager);
  trainer_free(&tr);
  return status;
}

int main(int argc, char** argv) {
  build_specs();
  if (argc < 2 || (strcmp(argv[1], "train") != 0 && strcmp(argv[1], "resume") != 0)) {
    fprintf(stderr, "usage: %s train|resume --dir DIR [--steps N] [--save-every K]\n", argv[0]);
    return 2;
  }
  const char* dir = arg(argc, argv, "--dir", "demo-out");
  if (strcmp(argv[1], "train") == 0) {
    return do_train(dir, atoi(arg(argc, argv, "--steps", "30")), atoi(arg(argc, argv, "--save-every", "10")));
  }
  return do_resume(dir, atoi(arg(argc, argv, "--steps", "5")));
}

#include "core/statedict/full_sharded.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/statedict/flatten.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

namespace dsd {
namespace {

// Copies the containers of a tree, transforming each tensor leaf with `fn`.
template <class Fn>
Result<Value> map_tensors(const Value& v, const std::string& path, Fn& fn) {
  if (const Dict* d = v.if_dict()) {
    auto out = Dict::make();
    out->reserve(d->size());
    out->set_int_keys(d->int_keys());
    for (const auto& e : *d) {
      Value mapped = TRY(map_tensors(e.value, path.empty() ? e.key : path + "." + e.key, fn));
      out->append_unique(e.key, std::move(mapped));
    }
    return Value(out);
  }
  if (const List* l = v.if_list()) {
    auto out = List::make(l->is_tuple());
    out->items().reserve(l->size());
    for (size_t i = 0; i < l->size(); ++i) {
      Value mapped = TRY(map_tensors((*l)[i], path + "." + std::to_string(i), fn));
      out->push_back(std::move(mapped));
    }
    return Value(out);
  }
  if (const TensorValue* t = v.if_tensor()) return fn(*t, path);
  return v;
}

Result<at::Tensor> to_cpu(const at::Tensor& t, const std::string& key) {
  if (t.is_cpu()) return t;
  return torch_call(Code::kDevice, fmt::format("moving '{}' to CPU", key), [&] { return t.cpu(); });
}

// The whole tensor a single process holds: its shard must be all of it.
Result<at::Tensor> local_full(const TensorValue& t, const std::string& key) {
  const Chunk local = t.layout->local_chunk();
  if (local.sizes != t.layout->global_shape()) {
    return make_error_at(Code::kUnsupported, key,
                         "'{}' is sharded ({}) but there is no communicator to gather it with", key,
                         t.layout->str());
  }
  return t.tensor;
}

}  // namespace

namespace {

constexpr uint64_t kDefaultBucketBytes = 64ull << 20;

// Byte offsets inside collective buffers are kept 16-aligned so every piece can be viewed as
// its own dtype.
int64_t align16(int64_t n) { return (n + 15) & ~int64_t{15}; }

bool empty_chunk(const Chunk& c) {
  for (int64_t s : c.sizes) {
    if (s == 0) return true;
  }
  return c.sizes.empty();
}

// Every rank's chunk of a distributed tensor (an empty chunk for ranks that hold none).
std::vector<Chunk> rank_chunks(const Layout& layout, int world, const std::vector<Chunk>* exchanged) {
  std::vector<Chunk> out(static_cast<size_t>(world));
  const size_t nd = layout.global_shape().size();
  for (int r = 0; r < world; ++r) {
    Chunk c{std::vector<int64_t>(nd, 0), std::vector<int64_t>(nd, 0)};
    if (layout.is_explicit()) {
      if (exchanged != nullptr) c = (*exchanged)[static_cast<size_t>(r)];
    } else if (auto coord = layout.mesh()->coordinate_of(r)) {
      c = layout.chunk_at(*coord);
    }
    out[static_cast<size_t>(r)] = std::move(c);
  }
  return out;
}

at::Tensor box_of(const at::Tensor& full, const Chunk& c) {
  at::Tensor v = full;
  for (size_t d = 0; d < c.sizes.size(); ++d) {
    const int64_t off = std::min(c.offsets[d], full.size(static_cast<int64_t>(d)));
    v = v.narrow(static_cast<int64_t>(d), off, c.sizes[d]);
  }
  return v;
}

struct Gathered {
  std::string key;
  Value* slot;                 // where the full tensor goes, in the copied tree
  TensorValue local;
  std::vector<Chunk> chunks;   // per rank
  int64_t element_size = 0;
  int64_t full_bytes = 0;
};

// When rank r holds rows [r * n, r * n + size_r) of dim 0 (size_r <= n) and all of the other
// dims, for every rank in order (FSDP's Shard(0), even or uneven as torch.chunk cuts), an
// all-gather of n rows per rank lands every piece in place: the full tensor is the first rows
// of the output. Returns n, or 0 when the chunks are laid out otherwise.
int64_t rows_in_place(const Gathered& g) {
  const size_t world = g.chunks.size();
  const std::vector<int64_t>& shape = g.local.layout->global_shape();
  if (shape.empty() || world == 0) return 0;
  const int64_t n = (shape[0] + static_cast<int64_t>(world) - 1) / static_cast<int64_t>(world);
  if (n == 0) return 0;
  for (size_t r = 0; r < world; ++r) {
    const Chunk& c = g.chunks[r];
    if (c.sizes.size() != shape.size()) return 0;
    const int64_t size = c.sizes[0];
    if (size > n) return 0;
    if (size > 0 && c.offsets[0] != static_cast<int64_t>(r) * n) return 0;
    if (size == 0 && std::min(static_cast<int64_t>(r) * n, shape[0]) < shape[0] &&
        static_cast<int64_t>(r) * n < shape[0]) {
      return 0;  // an empty chunk where rows should be
    }
    for (size_t d = 1; d < shape.size(); ++d) {
      if (size > 0 && (c.offsets[d] != 0 || c.sizes[d] != shape[d])) return 0;
    }
  }
  // The pieces must cover the rows exactly.
  int64_t covered = 0;
  for (const Chunk& c : g.chunks) covered += c.sizes[0];
  return covered == shape[0] ? n : 0;
}

// Gathers one tensor whose pieces land in place (see rows_in_place): one collective, no
// unpacking.
Status gather_in_place(Communicator& comm, Gathered& g, int64_t rows, bool cpu_offload, bool rank0_only) {
  const int world = comm.size();
  const bool receive = !rank0_only || comm.rank() == 0;
  const c10::Device comm_device(comm.device_type());
  const std::vector<int64_t>& shape = g.local.layout->global_shape();
  std::vector<int64_t> padded = shape;
  padded[0] = rows * world;
  const auto options = at::TensorOptions().dtype(g.local.tensor.scalar_type()).device(comm_device);
  std::vector<int64_t> piece_shape = shape;
  piece_shape[0] = rows;
  at::Tensor send;
  if (g.local.tensor.size(0) == rows && g.local.tensor.device() == comm_device && g.local.tensor.is_contiguous()) {
    send = g.local.tensor.view(-1);
  } else {
    send = at::zeros(piece_shape, options);
    if (g.local.tensor.numel() > 0) send.narrow(0, 0, g.local.tensor.size(0)).copy_(g.local.tensor);
    send = send.view(-1);
  }
  at::Tensor out = receive ? at::empty(padded, options) : at::empty({0}, options);
  at::Tensor flat = receive ? out.view(-1) : out;
  if (rank0_only) {
    TRY(comm.gather(flat, send, 0));
  } else {
    TRY(comm.all_gather(flat, send));
  }
  if (!receive) return ok();
  at::Tensor full = out.narrow(0, 0, shape[0]);
  if (full.device() != (cpu_offload ? c10::Device(c10::DeviceType::CPU) : g.local.tensor.device())) {
    full = full.to(cpu_offload ? c10::Device(c10::DeviceType::CPU) : g.local.tensor.device());
  }
  *g.slot = Value(TensorValue{full, nullptr, false});
  return ok();
}

Result<std::string> explicit_chunks_blob(const std::vector<Gathered*>& explicit_leaves) {
  std::string blob;
  for (const Gathered* g : explicit_leaves) {
    const Chunk c = g->local.layout->local_chunk();
    for (int64_t v : c.offsets) blob.append(reinterpret_cast<const char*>(&v), sizeof v);
    for (int64_t v : c.sizes) blob.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  return blob;
}

// Gathers one bucket of tensors with one collective.
Status gather_bucket(Communicator& comm, std::vector<Gathered*>& bucket, bool cpu_offload, bool rank0_only) {
  const int world = comm.size();
  const int rank = comm.rank();
  const bool receive = !rank0_only || rank == 0;
  const c10::Device comm_device(comm.device_type());
  auto target_device = [&](const Gathered& g) {
    return cpu_offload ? c10::Device(c10::DeviceType::CPU) : g.local.tensor.device();
  };

  // Pack this rank's chunks into one byte buffer, padded to the largest rank's.
  std::vector<int64_t> per_rank(static_cast<size_t>(world), 0);
  for (const Gathered* g : bucket) {
    for (int r = 0; r < world; ++r) {
      per_rank[static_cast<size_t>(r)] += align16(g->chunks[static_cast<size_t>(r)].numel() * g->element_size);
    }
  }
  const int64_t max_bytes = std::max<int64_t>(16, *std::max_element(per_rank.begin(), per_rank.end()));
  at::Tensor send = at::empty({max_bytes}, at::TensorOptions().dtype(at::kByte).device(comm_device));
  int64_t at_byte = 0;
  for (const Gathered* g : bucket) {
    const int64_t n = g->chunks[static_cast<size_t>(rank)].numel() * g->element_size;
    if (n > 0) {
      at::Tensor local = g->local.tensor.contiguous().view(-1).view(at::kByte);
      send.narrow(0, at_byte, n).copy_(local);
    }
    at_byte += align16(n);
  }
  at::Tensor recv = at::empty({receive ? max_bytes * world : max_bytes},
                              at::TensorOptions().dtype(at::kByte).device(comm_device));
  if (rank0_only) {
    TRY(comm.gather(recv, send, 0));
  } else {
    TRY(comm.all_gather(recv, send));
  }
  if (!receive) return ok();

  // Unpack: each distinct chunk once (replicas hold the same bytes).
  std::vector<int64_t> cursor(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) cursor[static_cast<size_t>(r)] = static_cast<int64_t>(r) * max_bytes;
  for (Gathered* g : bucket) {
    const auto dtype = g->local.tensor.scalar_type();
    at::Tensor full = at::empty(g->local.layout->global_shape(), at::TensorOptions().dtype(dtype).device(comm_device));
    std::vector<const Chunk*> done;
    for (int r = 0; r < world; ++r) {
      const Chunk& c = g->chunks[static_cast<size_t>(r)];
      const int64_t n = c.numel() * g->element_size;
      const int64_t start = cursor[static_cast<size_t>(r)];
      cursor[static_cast<size_t>(r)] += align16(n);
      if (n == 0 || empty_chunk(c)) continue;
      bool seen = false;
      for (const Chunk* d : done) seen = seen || *d == c;
      if (seen) continue;
      done.push_back(&c);
      at::Tensor piece = recv.narrow(0, start, n).view(dtype).view(c.sizes);
      box_of(full, c).copy_(piece);
    }
    *g->slot = Value(TensorValue{full.to(target_device(*g)), nullptr, false});
  }
  return ok();
}

// Copies the containers of `v`, recording the slot of every distributed tensor leaf.
Value copy_collecting(const Value& v, const std::string& path, std::vector<Gathered>& leaves) {
  if (const Dict* d = v.if_dict()) {
    auto out = Dict::make();
    out->reserve(d->size());
    out->set_int_keys(d->int_keys());
    for (const auto& e : *d) out->append_unique(e.key, copy_collecting(e.value, path.empty() ? e.key : path + "." + e.key, leaves));
    return Value(out);
  }
  if (const List* l = v.if_list()) {
    auto out = List::make(l->is_tuple());
    for (size_t i = 0; i < l->size(); ++i) out->push_back(copy_collecting((*l)[i], path + "." + std::to_string(i), leaves));
    return Value(out);
  }
  if (const TensorValue* t = v.if_tensor(); t != nullptr && t->is_dist()) {
    Gathered g;
    g.key = path;
    g.slot = nullptr;
    g.local = *t;
    leaves.push_back(std::move(g));
  }
  return v;
}

void bind_slots(Value& v, std::vector<Gathered>& leaves, size_t& next) {
  if (Dict* d = v.if_dict()) {
    for (auto& e : *d) bind_slots(e.value, leaves, next);
  } else if (List* l = v.if_list()) {
    for (auto& item : l->items()) bind_slots(item, leaves, next);
  } else if (const TensorValue* t = v.if_tensor(); t != nullptr && t->is_dist()) {
    leaves[next++].slot = &v;
  }
}

Status check_same_structure(Communicator& comm, const std::vector<Gathered>& leaves) {
  std::string sig;
  for (const Gathered& g : leaves) {
    sig += g.key;
    sig += '\0';
    sig += c10::toString(g.local.tensor.scalar_type());
    for (int64_t s : g.local.layout->global_shape()) sig += fmt::format(",{}", s);
    sig += '\n';
  }
  const uint64_t mine = std::hash<std::string>{}(sig);
  std::vector<std::string> all = TRY(all_gather_bytes(comm, std::string_view(reinterpret_cast<const char*>(&mine), sizeof mine)));
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r] != all[0]) {
      return make_error(Code::kInvalidArgument,
                        "the distributed tensors of the state dict differ across ranks (rank {} and rank 0 "
                        "disagree on keys, dtypes or global shapes); every rank must pass the same structure",
                        r);
    }
  }
  return ok();
}

}  // namespace

Result<DictPtr> gather_state_dict(DictPtr state_dict, Communicator* comm, bool cpu_offload,
                                  bool rank0_only, uint64_t bucket_bytes) {
  std::vector<Gathered> leaves;
  Value tree = copy_collecting(Value(state_dict), "", leaves);
  size_t next = 0;
  bind_slots(tree, leaves, next);

  const bool distributed = comm != nullptr && comm->size() > 1;
  if (!distributed) {
    for (Gathered& g : leaves) {
      at::Tensor full = TRY(local_full(g.local, g.key));
      *g.slot = Value(TensorValue{full, nullptr, g.local.read_only});
    }
  } else {
    TRY(check_same_structure(*comm, leaves));
    const int world = comm->size();
    std::vector<Gathered*> explicit_leaves;
    for (Gathered& g : leaves) {
      if (g.local.layout->is_explicit()) explicit_leaves.push_back(&g);
    }
    std::vector<std::vector<Chunk>> exchanged(leaves.size());
    if (!explicit_leaves.empty()) {
      std::string blob = TRY(explicit_chunks_blob(explicit_leaves));
      std::vector<std::string> all = TRY(all_gather_bytes(*comm, blob));
      for (int r = 0; r < world; ++r) {
        const auto* p = reinterpret_cast<const int64_t*>(all[static_cast<size_t>(r)].data());
        for (Gathered* g : explicit_leaves) {
          const size_t nd = g->local.layout->global_shape().size();
          Chunk c{std::vector<int64_t>(p, p + nd), std::vector<int64_t>(p + nd, p + 2 * nd)};
          p += 2 * nd;
          exchanged[static_cast<size_t>(g - leaves.data())].push_back(std::move(c));
        }
      }
    }
    for (size_t i = 0; i < leaves.size(); ++i) {
      Gathered& g = leaves[i];
      g.chunks = rank_chunks(*g.local.layout, world, g.local.layout->is_explicit() ? &exchanged[i] : nullptr);
      g.element_size = static_cast<int64_t>(g.local.tensor.element_size());
      g.full_bytes = g.local.layout->global_numel() * g.element_size;
    }
    const uint64_t limit = bucket_bytes == 0 ? kDefaultBucketBytes : bucket_bytes;
    std::vector<Gathered*> bucket;
    uint64_t bytes = 0;
    for (Gathered& g : leaves) {
      // Large FSDP-style shards go alone, straight into their full tensor; small tensors share
      // buckets, so 10,000 of them cost a few collectives.
      if (const int64_t rows = rows_in_place(g); rows > 0 && g.full_bytes >= (1 << 20)) {
        TRY(torch_call(Code::kComm, "gathering a full state dict",
                       [&] { return gather_in_place(*comm, g, rows, cpu_offload, rank0_only); }));
        continue;
      }
      if (!bucket.empty() && bytes + static_cast<uint64_t>(g.full_bytes) > limit) {
        TRY(torch_call(Code::kComm, "gathering a full state dict", [&] { return gather_bucket(*comm, bucket, cpu_offload, rank0_only); }));
        bucket.clear();
        bytes = 0;
      }
      bucket.push_back(&g);
      bytes += static_cast<uint64_t>(g.full_bytes);
    }
    if (!bucket.empty()) {
      TRY(torch_call(Code::kComm, "gathering a full state dict", [&] { return gather_bucket(*comm, bucket, cpu_offload, rank0_only); }));
    }
  }
  if (rank0_only && distributed && comm->rank() != 0) return Dict::make();
  if (cpu_offload) {
    auto to_cpu_fn = [&](const TensorValue& t, const std::string& key) -> Result<Value> {
      at::Tensor cpu = TRY(to_cpu(t.tensor, key));
      return Value(TensorValue{cpu, nullptr, t.read_only});
    };
    tree = TRY(map_tensors(tree, "", to_cpu_fn));
  }
  return tree.dict_ptr();
}

Result<DictPtr> offload_state_dict_to_cpu(DictPtr state_dict) {
  auto fn = [&](const TensorValue& t, const std::string& key) -> Result<Value> {
    at::Tensor cpu = TRY(to_cpu(t.tensor, key));
    return Value(TensorValue{cpu, t.layout, t.read_only});
  };
  Value out = TRY(map_tensors(Value(state_dict), "", fn));
  return out.dict_ptr();
}

Result<at::Tensor> local_slice(const at::Tensor& full, const Layout& layout, std::string_view key) {
  if (full.sizes() != c10::IntArrayRef(layout.global_shape())) {
    return make_error_at(Code::kShapeMismatch, std::string(key),
                         "'{}' has shape [{}] but its layout's global shape is [{}]", key,
                         fmt::join(full.sizes(), ", "), fmt::join(layout.global_shape(), ", "));
  }
  const Chunk c = layout.local_chunk();
  if (c.offsets.size() != static_cast<size_t>(full.dim())) {
    return full.flatten().narrow(0, 0, 0);  // this rank is not in the layout's mesh
  }
  at::Tensor view = full;
  for (size_t d = 0; d < c.sizes.size() && d < static_cast<size_t>(full.dim()); ++d) {
    const int64_t off = std::min(c.offsets[d], full.size(static_cast<int64_t>(d)));
    view = view.narrow(static_cast<int64_t>(d), off, c.sizes[d]);
  }
  return view;
}

}  // namespace dsd

namespace dsd {

at::Tensor CopySource::view() const { return box ? box_of(tensor, *box) : tensor; }

Result<CopySource> copy_source(const TensorValue& dst, const TensorValue& src, const std::string& key) {
  if (dst.is_dist() && !src.is_dist()) {
    if (src.tensor.sizes() != c10::IntArrayRef(dst.layout->global_shape())) {
      return make_error_at(Code::kShapeMismatch, key, "'{}' has shape [{}] but the model's global shape is [{}]", key,
                           fmt::join(src.tensor.sizes(), ", "), fmt::join(dst.layout->global_shape(), ", "));
    }
    Chunk c = dst.layout->local_chunk();
    if (c.offsets.size() != static_cast<size_t>(src.tensor.dim())) {
      c = Chunk{std::vector<int64_t>(static_cast<size_t>(src.tensor.dim()), 0),
                std::vector<int64_t>(static_cast<size_t>(src.tensor.dim()), 0)};  // not in the mesh
    }
    return CopySource{src.tensor, std::move(c)};
  }
  if (!dst.is_dist() && src.is_dist()) {
    const Chunk local = src.layout->local_chunk();
    if (local.sizes != src.layout->global_shape()) {
      return make_error_at(Code::kUnsupported, key,
                           "'{}' is given as a sharded tensor ({}) but the model's tensor is not sharded; "
                           "pass a full state dict instead",
                           key, src.layout->str());
    }
  }
  if (dst.is_dist() && src.is_dist() && !(*dst.layout == *src.layout)) {
    return make_error_at(Code::kUnsupported, key,
                         "'{}' is sharded as {} but the state dict holds it as {}; resharding needs a full "
                         "state dict or a checkpoint load",
                         key, dst.layout->str(), src.layout->str());
  }
  return CopySource{src.tensor, std::nullopt};
}

Status run_copies(const std::vector<CopyJob>& jobs) {
  for (const CopyJob& j : jobs) {
    at::Tensor src = j.src.view();
    if (j.dst.is_same(src)) continue;
    TRY(torch_call(Code::kInternal, fmt::format("copying into {}", j.what), [&] { j.dst.copy_(src); }));
  }
  return ok();
}

namespace {

struct Piece {
  size_t tensor;
  int64_t row0, row1;  // rows of dim 0 (0, 1 for a 0-d tensor)
  int64_t bytes;
};

// Copies the rows [p.row0, p.row1) of a source tensor, arriving as `piece`, into each job.
Status consume_piece(const Piece& p, const at::Tensor& piece, const std::vector<const CopyJob*>& consumers) {
  for (const CopyJob* j : consumers) {
    at::Tensor dst = j->dst;
    at::Tensor src = piece;
    if (piece.dim() > 0) {
      const int64_t off = j->src.box ? j->src.box->offsets[0] : 0;
      const int64_t size = j->src.box ? j->src.box->sizes[0] : j->src.tensor.size(0);
      const int64_t lo = std::max(off, p.row0);
      const int64_t hi = std::min(off + size, p.row1);
      if (hi <= lo) continue;
      dst = dst.narrow(0, lo - off, hi - lo);
      src = src.narrow(0, lo - p.row0, hi - lo);
      if (j->src.box) {
        for (size_t d = 1; d < j->src.box->sizes.size(); ++d) {
          src = src.narrow(static_cast<int64_t>(d), j->src.box->offsets[d], j->src.box->sizes[d]);
        }
      }
    }
    if (dst.numel() == 0) continue;
    TRY(torch_call(Code::kInternal, fmt::format("copying into {}", j->what), [&] { dst.copy_(src); }));
  }
  return ok();
}

}  // namespace

Status broadcast_copies(Communicator& comm, const std::vector<at::Tensor>& rank0_tensors,
                        const std::vector<at::Tensor>& placeholders, const std::vector<CopyJob>& jobs,
                        uint64_t bucket_bytes) {
  const uint64_t limit = bucket_bytes == 0 ? kDefaultBucketBytes : bucket_bytes;
  const bool root = comm.rank() == 0;
  std::unordered_map<const void*, size_t> index_of;
  for (size_t i = 0; i < placeholders.size(); ++i) index_of.emplace(placeholders[i].unsafeGetTensorImpl(), i);
  std::vector<std::vector<const CopyJob*>> consumers(placeholders.size());
  for (const CopyJob& j : jobs) {
    auto it = index_of.find(j.src.tensor.unsafeGetTensorImpl());
    if (it == index_of.end()) {
      return Error(Code::kInternal, "a broadcast copy does not come from rank 0's state dict");
    }
    consumers[it->second].push_back(&j);
  }
  if (root && rank0_tensors.size() != placeholders.size()) {
    return Error(Code::kInternal, "rank 0's tensors and the skeleton disagree");
  }
  // Cut every tensor into row ranges of at most one bucket (at least one row).
  std::vector<Piece> pieces;
  for (size_t i = 0; i < placeholders.size(); ++i) {
    const at::Tensor& t = placeholders[i];
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    if (bytes == 0) continue;
    const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    const int64_t row_bytes = bytes / rows;
    const int64_t per_piece = std::max<int64_t>(1, static_cast<int64_t>(limit) / row_bytes);
    for (int64_t r = 0; r < rows; r += per_piece) {
      const int64_t r1 = std::min(rows, r + per_piece);
      pieces.push_back({i, r, r1, (r1 - r) * row_bytes});
    }
  }
  int64_t buffer_bytes = 0;
  int64_t total = 0;
  for (const Piece& p : pieces) {
    buffer_bytes = std::max(buffer_bytes, align16(p.bytes));
    total += align16(p.bytes);
  }
  buffer_bytes = std::max<int64_t>(buffer_bytes, std::min<int64_t>(static_cast<int64_t>(limit), total));
  if (pieces.empty()) return ok();
  at::Tensor buffer = at::empty({buffer_bytes}, at::TensorOptions().dtype(at::kByte).device(comm.device_type()));

  size_t first = 0;
  while (first < pieces.size()) {
    size_t last = first;
    int64_t used = 0;
    while (last < pieces.size() && (last == first || used + align16(pieces[last].bytes) <= buffer_bytes)) {
      used += align16(pieces[last++].bytes);
    }
    int64_t at_byte = 0;
    if (root) {
      for (size_t k = first; k < last; ++k) {
        const Piece& p = pieces[k];
        at::Tensor t = rank0_tensors[p.tensor];
        at::Tensor rows = t.dim() == 0 ? t.reshape({1}) : t.narrow(0, p.row0, p.row1 - p.row0);
        TRY(torch_call(Code::kInternal, "packing a broadcast bucket", [&] {
          buffer.narrow(0, at_byte, p.bytes).copy_(rows.contiguous().view(-1).view(at::kByte));
        }));
        at_byte += align16(p.bytes);
      }
    }
    at::Tensor chunk = buffer.narrow(0, 0, used);
    TRY(comm.broadcast(chunk, 0));
    at_byte = 0;
    for (size_t k = first; k < last; ++k) {
      const Piece& p = pieces[k];
      const at::Tensor& ph = placeholders[p.tensor];
      std::vector<int64_t> shape(ph.sizes().begin(), ph.sizes().end());
      if (!shape.empty()) shape[0] = p.row1 - p.row0;
      at::Tensor piece = buffer.narrow(0, at_byte, p.bytes).view(ph.scalar_type()).view(shape);
      TRY(consume_piece(p, piece, consumers[p.tensor]));
      at_byte += align16(p.bytes);
    }
    first = last;
  }
  return ok();
}

}  // namespace dsd

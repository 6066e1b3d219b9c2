#include "core/checkpoint/async_save.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/save_planner.h"
#include "core/statedict/flatten.h"

namespace dsd::checkpoint {
namespace {

constexpr uint64_t kCopyPiece = 32u << 20;

// Tensor leaves of a tree in traversal order, mutable.
template <class Fn>
void for_each_tensor(Value& v, Fn&& fn) {
  if (Dict* d = v.if_dict()) {
    for (size_t i = 0; i < d->size(); ++i) for_each_tensor(d->value_at(i), fn);
  } else if (List* l = v.if_list()) {
    for (Value& x : l->items()) for_each_tensor(x, fn);
  } else if (TensorValue* t = v.if_tensor()) {
    fn(*t);
  }
}

struct Source {
  at::Tensor tensor;
  size_t storage = SIZE_MAX;  // index into the unique storages; SIZE_MAX: no data to copy
};

// The tensor leaves of a (deep-copied) state dict and the storages behind them.
struct Inventory {
  std::vector<Source> sources;                    // one per tensor leaf, in traversal order
  std::vector<const c10::StorageImpl*> storages;  // unique
  std::vector<at::Tensor> first_user;             // per storage: the first leaf on it
  std::string structure;                          // what the structure-keyed buffers are for
  uint64_t bytes = 0;                             // of the unique storages
};

Inventory take_inventory(Value& root) {
  Inventory inv;
  std::unordered_map<const c10::StorageImpl*, size_t> storage_index;
  for_each_tensor(root, [&](TensorValue& tv) {
    const at::Tensor& t = tv.tensor;
    size_t idx = SIZE_MAX;
    if (t.defined() && !t.is_meta() && t.has_storage() && t.storage().data() != nullptr) {
      const c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
      auto [it, fresh] = storage_index.emplace(impl, inv.storages.size());
      if (fresh) {
        inv.storages.push_back(impl);
        inv.first_user.push_back(t);
        inv.bytes += impl->nbytes();
      }
      idx = it->second;
    }
    inv.sources.push_back({t, idx});
    inv.structure += fmt::format("{}|{}|{}|{}|{}|{}|{}|{};", static_cast<int>(t.scalar_type()),
                                 fmt::join(t.sizes(), ","), fmt::join(t.strides(), ","),
                                 t.storage_offset(), idx,
                                 idx == SIZE_MAX ? 0 : t.storage().nbytes(), t.device().str(),
                                 (t.is_conj() ? 1 : 0) + (t.is_neg() ? 2 : 0));
  });
  return inv;
}

// What a leaf without data to copy is staged as: a meta placeholder stays one (the caller's
// tensor_provider supplies it), anything else is empty or storage-less.
at::Tensor stage_dataless(const at::Tensor& t) {
  if (t.defined() && t.is_meta()) return t;
  return at::empty(t.sizes(), at::TensorOptions().dtype(t.dtype()));
}

// Where a tensor sits in its storage: what a staged view of it copies.
struct ViewSpec {
  std::vector<int64_t> sizes, strides;
  int64_t offset_bytes = 0;
  caffe2::TypeMeta dtype;
  bool conj = false, neg = false;
};

ViewSpec spec_of(const at::Tensor& t) {
  return {t.sizes().vec(), t.strides().vec(), t.storage_offset() * static_cast<int64_t>(t.element_size()),
          t.dtype(), t.is_conj(), t.is_neg()};
}

// A tensor laid out as `s` over `base`, the staged copy of its storage; `deleter` (if any)
// runs when the view's storage goes.
at::Tensor view_like(const ViewSpec& s, char* base, std::function<void(void*)> deleter = {}) {
  const auto opts = at::TensorOptions().dtype(s.dtype);
  char* p = base + s.offset_bytes;
  at::Tensor view = deleter ? at::from_blob(p, s.sizes, s.strides, std::move(deleter), opts)
                            : at::from_blob(p, s.sizes, s.strides, opts);
  if (s.conj) view = view.conj();
  if (s.neg) view = view._neg_view();
  return view;
}

// Copies the whole storage of device tensor `t` into the host byte tensor `dst`, on this
// thread's current stream, waiting for it.
Status copy_device_storage(const at::Tensor& t, at::Tensor& dst) {
  return torch_call(Code::kDevice, "copying a device tensor to the staging buffer", [&] {
    at::Tensor src = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(t.device()));
    src.set_(t.storage(), 0, {static_cast<int64_t>(t.storage().nbytes())}, {1});
    dst.copy_(src);
  });
}

// Copies the storage of `t` into `dst` (a host byte tensor of its size).
Status copy_storage(const at::Tensor& t, at::Tensor& dst) {
  if (!t.device().is_cpu()) return copy_device_storage(t, dst);
  const uint64_t n = t.storage().nbytes();
  const auto* from = static_cast<const char*>(t.storage().data());
  auto* to = static_cast<char*>(dst.data_ptr());
  const size_t pieces = static_cast<size_t>((n + kCopyPiece - 1) / kCopyPiece);
  return parallel_for(pieces, default_threads(0, 4), [&](size_t k) -> Status {
    const uint64_t off = k * kCopyPiece;
    std::memcpy(to + off, from + off, std::min(kCopyPiece, n - off));
    return ok();
  });
}

Result<at::Tensor> new_host_buffer(uint64_t n, bool pin) {
  return torch_call(Code::kOutOfMemory, "allocating an async staging buffer", [&] {
    return at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte).pinned_memory(pin));
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SaveFuture

bool SaveFuture::is_staged() const {
  std::lock_guard<std::mutex> lock(mu_);
  return staged_;
}

bool SaveFuture::is_done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

Status SaveFuture::wait(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout.count() < 0) {
    cv_.wait(lock, [&] { return done_; });
  } else if (!cv_.wait_for(lock, timeout, [&] { return done_; })) {
    return make_error(Code::kTimeout, "the asynchronous save is still running after {} ms", timeout.count());
  }
  return status_;
}

std::string SaveFuture::save_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return save_id_;
}

void SaveFuture::set_staged() {
  std::lock_guard<std::mutex> lock(mu_);
  staged_ = true;
}

void SaveFuture::set_done(Result<SaveInfo> result) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (result.ok()) {
      save_id_ = result->save_id;
    } else {
      status_ = std::move(result).error();
    }
    staged_ = true;
    done_ = true;
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Staging

struct AsyncCheckpointer::Staging {
  std::string structure;            // what the buffers were made for
  std::vector<at::Tensor> buffers;  // one per unique source storage
  std::vector<at::Tensor> views;    // one per tensor leaf, in traversal order
};

// The staging of a capped save (async_save.h). Three kinds of threads meet here: the
// caller's (serve: every copy, every allocation and every free of a buffer), the writer
// threads of the background save (provide, and the deleters of the views they drop), and the
// background thread itself (plan, finish). Everything below `mu` is guarded by it; the
// lookup tables are written before the save starts and only read afterwards.
struct AsyncCheckpointer::Waves : std::enable_shared_from_this<Waves> {
  struct Unit {           // one storage of the caller's state
    at::Tensor source;    // a leaf on it, until staging ends
    uint64_t bytes = 0;
    std::string key;      // of a leaf on it, for messages
    int buffer = -1;      // the buffer holding its bytes now; -1: none
    int pending = 0;      // planned leaves on it not yet handed to their writer
  };
  struct Leaf {
    ViewSpec spec;
    size_t unit = 0;
    std::string key;
    bool planned = false; // this rank writes it
    bool asked = false;   // by its writer
    int given = -1;       // the buffer handed to its writer (one use counted for it)
  };
  struct Buffer {
    at::Tensor data;      // undefined: a free slot
    uint64_t bytes = 0;
    int unit = -1;        // whose bytes it holds; -1: none
    int users = 0;        // views alive, +1 while it is being filled
  };
  enum class Fill { kDone, kNoRoom, kStop };

  Waves(uint64_t budget, bool pin, std::atomic<uint64_t>& peak, uint64_t& allocations)
      : budget(budget), pin(pin), peak(peak), allocations(allocations) {}

  const uint64_t budget;
  const bool pin;
  std::atomic<uint64_t>& peak;  // the checkpointer's, written on the caller's thread
  uint64_t& allocations;        // likewise
  std::unordered_map<const c10::TensorImpl*, size_t> by_placeholder;
  std::unordered_map<std::string, size_t> by_key;
  std::atomic<uint64_t> allocated{0};  // bytes of buffers; changed under mu by the caller's thread

  std::mutex mu;
  std::condition_variable cv;
  std::vector<Unit> units;
  std::vector<Leaf> leaves;
  std::vector<Buffer> buffers;
  std::deque<size_t> asked;                // leaves writers wait for, in the order they asked
  std::deque<size_t> ahead;                // leaves to copy before they are asked, in the order expected
  size_t to_hand_out = 0;
  size_t handed_out = 0;
  bool planned = false;
  bool finished = false;  // the background save returned
  bool serving = true;    // serve() has not returned
  Status failure;         // of a copy or an allocation

  // Background thread, before this rank writes: which leaves it writes, file by file.
  void plan(const RankPlan& rp) {
    {
      std::lock_guard<std::mutex> lock(mu);
      // Every file has its writer thread, all starting at once: a leaf is asked for about
      // when its file's writer has written the bytes before it, which orders the copies ahead.
      std::vector<std::pair<uint64_t, size_t>> when;
      for (const FilePlan& fp : rp.files) {
        uint64_t before = 0;
        for (size_t i : fp.items) {
          auto it = by_key.find(rp.items[i].key);
          if (it == by_key.end() || leaves[it->second].planned) continue;
          Leaf& l = leaves[it->second];
          l.planned = true;
          ++units[l.unit].pending;
          ++to_hand_out;
          when.emplace_back(before, it->second);
          before += rp.items[i].storage_bytes();
        }
      }
      std::stable_sort(when.begin(), when.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      for (const auto& [bytes, li] : when) ahead.push_back(li);
      planned = true;
    }
    cv.notify_all();
  }

  // A writer thread: the staged data for `placeholder`, once the caller's thread copied it;
  // nullopt when the placeholder is not one of ours. The view is made here, outside `mu`:
  // its deleter takes `mu`.
  Result<std::optional<at::Tensor>> provide(const at::Tensor& placeholder) {
    auto it = by_placeholder.find(placeholder.unsafeGetTensorImpl());
    if (it == by_placeholder.end()) return std::optional<at::Tensor>();
    std::unique_lock<std::mutex> lock(mu);
    Leaf& l = leaves[it->second];
    if (!failure.ok()) return failure.error();
    if (l.asked || !serving) {
      return make_error_at(Code::kInternal, l.key, "'{}' was asked for after the async staging ended", l.key);
    }
    l.asked = true;
    asked.push_back(it->second);
    cv.notify_all();
    cv.wait(lock, [&] { return l.given >= 0 || !failure.ok() || !serving; });
    if (l.given < 0) {
      if (!failure.ok()) return failure.error();
      return make_error_at(Code::kInternal, l.key, "'{}' was not staged before the async staging ended", l.key);
    }
    const int b = l.given;
    char* base = static_cast<char*>(buffers[static_cast<size_t>(b)].data.data_ptr());
    lock.unlock();
    std::weak_ptr<Waves> self = weak_from_this();
    auto view = torch_call(Code::kInternal, fmt::format("staging '{}'", l.key), [&] {
      return view_like(l.spec, base, [self, b](void*) {
        if (auto w = self.lock()) w->release(b);
      });
    });
    if (!view.ok()) {
      release(b);
      return std::move(view).error();
    }
    return std::optional<at::Tensor>(std::move(*view));
  }

  // Background thread, once the save returned: no writer asks for anything any more. Waits
  // for serve() to return, so the future is never done while the caller's tensors are read.
  void finish() {
    std::unique_lock<std::mutex> lock(mu);
    finished = true;
    cv.notify_all();
    cv.wait(lock, [&] { return !serving; });
  }

  // The caller's thread: copies until every planned leaf was handed out, a copy failed or
  // the save ended.
  void serve() {
    std::unique_lock<std::mutex> lock(mu);
    while (!finished && failure.ok() && !(planned && handed_out == to_hand_out)) {
      if (!asked.empty()) {
        const size_t li = asked.front();
        const size_t u = leaves[li].unit;
        if (units[u].buffer < 0 && fill(lock, u, /*for_writer=*/true) != Fill::kDone) continue;
        asked.pop_front();
        hand_out(li);
        continue;
      }
      if (!ahead.empty()) {
        const Leaf& l = leaves[ahead.front()];
        if (l.asked || units[l.unit].buffer >= 0) {
          ahead.pop_front();
          continue;
        }
        const Fill f = fill(lock, l.unit, /*for_writer=*/false);
        if (f == Fill::kDone) ahead.pop_front();
        if (f != Fill::kNoRoom) continue;
      }
      cv.wait(lock);  // a writer asks, drops a view, the plan comes or the save ends
    }
    serving = false;
    for (Unit& u : units) u.source = at::Tensor();  // the caller may change them now
    lock.unlock();
    cv.notify_all();
  }

  // The caller's thread, with no save running: the buffers, to keep or free on this thread.
  std::vector<at::Tensor> take_buffers() {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<at::Tensor> out;
    for (Buffer& b : buffers) {
      if (b.data.defined()) out.push_back(std::move(b.data));
    }
    buffers.clear();
    allocated = 0;
    return out;
  }

  // The caller's thread, before the save starts: buffers of the previous capped save, kept
  // up to the budget.
  void adopt(std::vector<at::Tensor> kept) {
    std::lock_guard<std::mutex> lock(mu);
    for (at::Tensor& t : kept) {
      const auto n = static_cast<uint64_t>(t.numel());
      if (allocated + n > budget) continue;  // freed with `kept`, here
      buffers.push_back({std::move(t), n, -1, 0});
      allocated += n;
    }
  }

 private:
  // A buffer's contents are still needed when it holds a unit with leaves to hand out.
  bool needed(const Buffer& b) const { return b.unit >= 0 && units[static_cast<size_t>(b.unit)].pending > 0; }
  static bool idle(const Buffer& b) { return b.data.defined() && b.users == 0; }

  void untag(Buffer& b) {
    if (b.unit >= 0) units[static_cast<size_t>(b.unit)].buffer = -1;
    b.unit = -1;
  }

  // A buffer of `n` bytes within the budget, or -1 (no room now) / -2 (allocation failed,
  // `failure` set): an idle buffer of that size nobody needs, else room made by freeing idle
  // buffers nobody needs. For a writer, then the same with copies made ahead that no writer
  // holds yet (copied again when asked for); never for another copy ahead.
  int find_buffer(uint64_t n, bool for_writer) {
    for (int pass = 0; pass < (for_writer ? 2 : 1); ++pass) {
      const bool take_needed = pass == 1;
      for (size_t b = 0; b < buffers.size(); ++b) {
        Buffer& x = buffers[b];
        if (idle(x) && x.bytes == n && needed(x) == take_needed) {
          untag(x);
          return static_cast<int>(b);
        }
      }
      for (size_t b = 0; b < buffers.size() && allocated + n > budget; ++b) {
        Buffer& x = buffers[b];
        if (!idle(x) || needed(x) != take_needed) continue;
        untag(x);
        allocated -= x.bytes;
        x = Buffer{};  // freed here, on the caller's thread
      }
      if (allocated + n <= budget || allocated == 0) return allocate(n);  // alone when larger than the budget
    }
    return -1;
  }

  int allocate(uint64_t n) {
    Result<at::Tensor> t = new_host_buffer(n, pin);
    if (!t.ok()) {
      failure = std::move(t).error();
      return -2;
    }
    ++allocations;
    allocated += n;
    uint64_t p = peak.load();
    while (p < allocated && !peak.compare_exchange_weak(p, allocated)) {
    }
    size_t slot = 0;
    while (slot < buffers.size() && buffers[slot].data.defined()) ++slot;
    if (slot == buffers.size()) buffers.emplace_back();
    buffers[slot] = Buffer{std::move(*t), n, -1, 0};
    return static_cast<int>(slot);
  }

  // Copies unit `u` into a buffer; for a writer it waits for room, a copy ahead does not.
  Fill fill(std::unique_lock<std::mutex>& lock, size_t u, bool for_writer) {
    int b;
    while ((b = find_buffer(units[u].bytes, for_writer)) < 0) {
      if (b == -2 || !for_writer) return b == -2 ? Fill::kStop : Fill::kNoRoom;
      cv.wait(lock);
      if (finished || !failure.ok()) return Fill::kStop;
    }
    Buffer& buf = buffers[static_cast<size_t>(b)];
    buf.users = 1;  // nobody takes it while it fills
    at::Tensor dst = buf.data;
    const at::Tensor src = units[u].source;
    lock.unlock();
    Status s = copy_storage(src, dst);
    lock.lock();
    buffers[static_cast<size_t>(b)].users = 0;
    if (!s.ok()) {
      Error e = std::move(s).error();
      failure = make_error_at(e.code, units[u].key, "staging '{}': {}", units[u].key, e.message);
      cv.notify_all();
      return Fill::kStop;
    }
    buffers[static_cast<size_t>(b)].unit = static_cast<int>(u);
    units[u].buffer = b;
    return Fill::kDone;
  }

  // Gives leaf `li` its unit's buffer.
  void hand_out(size_t li) {
    Leaf& l = leaves[li];
    Unit& u = units[l.unit];
    ++buffers[static_cast<size_t>(u.buffer)].users;
    l.given = u.buffer;
    --u.pending;
    ++handed_out;
    cv.notify_all();
  }

  // A view's deleter, on whichever thread dropped it last.
  void release(int b) {
    {
      std::lock_guard<std::mutex> lock(mu);
      --buffers[static_cast<size_t>(b)].users;
    }
    cv.notify_all();
  }
};

struct AsyncCheckpointer::Job {
  DictPtr state;
  std::string path;
  SaveOptions options;
  OnCommit on_commit;
  Status incoming;
  std::shared_ptr<SaveFuture> future;
  std::shared_ptr<Waves> waves;  // a capped save's staging
};

AsyncCheckpointer::AsyncCheckpointer(std::shared_ptr<Communicator> comm) : comm_(std::move(comm)) {}

AsyncCheckpointer::~AsyncCheckpointer() {
  if (in_flight_) (void)in_flight_->wait();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  staging_.reset();  // on the thread that allocated it
  if (waves_) (void)waves_->take_buffers();
}

uint64_t AsyncCheckpointer::staged_bytes() const {
  uint64_t n = 0;
  if (staging_) {
    for (const at::Tensor& b : staging_->buffers) n += static_cast<uint64_t>(b.numel());
  }
  if (waves_) n += waves_->allocated.load();
  return n;
}

void AsyncCheckpointer::note_staged_bytes() {
  const uint64_t n = staged_bytes();
  uint64_t p = peak_.load();
  while (p < n && !peak_.compare_exchange_weak(p, n)) {
  }
}

Result<DictPtr> AsyncCheckpointer::stage(const Dict& state_dict) {
  DictPtr staged = deep_copy(state_dict);
  Value root(staged);
  Inventory inv = take_inventory(root);
  if (waves_) {
    (void)waves_->take_buffers();  // a capped save's: freed here, on the caller's thread
    waves_.reset();
  }

  if (!staging_ || staging_->structure != inv.structure) {
    staging_.reset();  // another structure: free the old buffers here, on the caller's thread
    auto s = std::make_unique<Staging>();
    s->structure = inv.structure;
    const bool pin = at::globalContext().hasCUDA();
    TRY(torch_call(Code::kOutOfMemory, "allocating the async staging buffers", [&] {
      for (const c10::StorageImpl* impl : inv.storages) {
        s->buffers.push_back(at::empty({static_cast<int64_t>(impl->nbytes())},
                                       at::TensorOptions().dtype(at::kByte).pinned_memory(pin)));
        ++allocations_;
      }
      for (const Source& src : inv.sources) {
        if (src.storage == SIZE_MAX) {
          s->views.push_back(stage_dataless(src.tensor));
        } else {
          s->views.push_back(view_like(spec_of(src.tensor), static_cast<char*>(s->buffers[src.storage].data_ptr())));
        }
      }
    }));
    staging_ = std::move(s);
  }
  note_staged_bytes();

  // Copy every unique storage once, in pieces spread over a few threads.
  struct Piece {
    size_t storage;
    uint64_t offset, len;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < inv.storages.size(); ++i) {
    const uint64_t n = inv.storages[i]->nbytes();
    if (inv.first_user[i].device().is_cpu()) {
      for (uint64_t off = 0; off < n; off += kCopyPiece) pieces.push_back({i, off, std::min(kCopyPiece, n - off)});
    } else {
      TRY(copy_device_storage(inv.first_user[i], staging_->buffers[i]));
    }
  }
  TRY(parallel_for(pieces.size(), default_threads(0, 4), [&](size_t k) -> Status {
    const Piece& p = pieces[k];
    std::memcpy(static_cast<char*>(staging_->buffers[p.storage].data_ptr()) + p.offset,
                static_cast<const char*>(inv.storages[p.storage]->data()) + p.offset, p.len);
    return ok();
  }));
  size_t i = 0;
  for_each_tensor(root, [&](TensorValue& tv) {
    tv.tensor = staging_->views[i++];
    tv.read_only = true;
  });
  return staged;
}

Result<DictPtr> AsyncCheckpointer::stage_in_waves(const Dict& state_dict, uint64_t max_bytes,
                                                  std::shared_ptr<Waves>& waves) {
  DictPtr staged = deep_copy(state_dict);
  Value root(staged);
  Inventory inv = take_inventory(root);
  if (inv.bytes <= max_bytes) return stage(state_dict);  // fits: staged whole, structure-keyed

  staging_.reset();  // an uncapped save's buffers would hold the whole state beside the budget
  auto w = std::make_shared<Waves>(max_bytes, at::globalContext().hasCUDA(), peak_, allocations_);
  if (waves_) {
    w->adopt(waves_->take_buffers());
    waves_.reset();
  }
  for (size_t i = 0; i < inv.storages.size(); ++i) {
    w->units.push_back({inv.first_user[i], inv.storages[i]->nbytes(), {}, -1, 0});
  }
  std::vector<at::Tensor> placeholders;
  TRY(torch_call(Code::kOutOfMemory, "making the async staging placeholders", [&] {
    for (const Source& src : inv.sources) {
      if (src.storage == SIZE_MAX) {
        placeholders.push_back(stage_dataless(src.tensor));
        continue;
      }
      at::Tensor ph = at::empty(src.tensor.sizes(), at::TensorOptions().dtype(src.tensor.dtype()).device(at::kMeta));
      w->by_placeholder.emplace(ph.unsafeGetTensorImpl(), w->leaves.size());
      w->leaves.push_back({spec_of(src.tensor), src.storage, {}, false, false, -1});
      placeholders.push_back(std::move(ph));
    }
  }));
  size_t i = 0;
  for_each_tensor(root, [&](TensorValue& tv) {
    tv.tensor = placeholders[i++];
    tv.read_only = true;
  });
  // Keys as the plan names them. A state that does not flatten fails in save() itself.
  if (auto flat = flatten_state_dict(*staged, FlattenStyle::kCheckpoint); flat.ok()) {
    for (size_t k = 0; k < flat->flat->size(); ++k) {
      const TensorValue* tv = flat->flat->value_at(k).if_tensor();
      if (tv == nullptr) continue;
      auto it = w->by_placeholder.find(tv->tensor.unsafeGetTensorImpl());
      if (it == w->by_placeholder.end()) continue;
      const std::string& key = flat->flat->key_at(k);
      Waves::Leaf& l = w->leaves[it->second];
      l.key = key;
      if (w->units[l.unit].key.empty()) w->units[l.unit].key = key;
      w->by_key.emplace(key, it->second);
    }
  }
  waves_ = w;
  note_staged_bytes();
  waves = std::move(w);
  return staged;
}

Result<std::shared_ptr<SaveFuture>> AsyncCheckpointer::save_async(const Dict& state_dict,
                                                                  const std::string& path,
                                                                  const SaveOptions& options,
                                                                  OnCommit on_commit) {
  if (in_flight_) {
    (void)in_flight_->wait();  // its buffers are about to be reused
    in_flight_.reset();
  }
  if (!async_comm_) async_comm_ = TRY(comm_->clone("async"));
  peak_ = 0;
  auto job = std::make_unique<Job>();
  std::shared_ptr<Waves> waves;
  auto staged = options.max_staging_bytes > 0 ? stage_in_waves(state_dict, options.max_staging_bytes, waves)
                                              : stage(state_dict);
  if (staged.ok()) {
    job->state = std::move(*staged);
  } else {
    job->state = Dict::make();
    job->incoming = std::move(staged).error();
    waves.reset();
  }
  job->path = path;
  job->options = options;
  if (waves) {
    // The placeholders' data comes from the copies save_async's thread makes as the writers
    // ask; the rank's write plan says which will be asked for, and in what order.
    job->options.tensor_provider = [waves, user = options.tensor_provider](
                                       const std::string& key, const at::Tensor& ph) -> Result<at::Tensor> {
      std::optional<at::Tensor> mine = TRY(waves->provide(ph));
      if (mine) return std::move(*mine);
      if (user) return user(key, ph);
      return make_error_at(Code::kInvalidArgument, key, "'{}' is a meta tensor, which has no data to save", key);
    };
    job->options.on_write_plan = [waves, user = options.on_write_plan](const RankPlan& rp) {
      waves->plan(rp);
      if (user) user(rp);
    };
    job->waves = waves;
  }
  job->on_commit = std::move(on_commit);
  job->future = std::make_shared<SaveFuture>();
  if (!waves) job->future->set_staged();
  in_flight_ = job->future;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
  }
  if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
  cv_.notify_all();
  if (waves) {
    waves->serve();  // returns once every tensor this rank writes was copied
    in_flight_->set_staged();
  }
  return in_flight_;
}

void AsyncCheckpointer::worker_loop() {
  while (true) {
    std::unique_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || job_ != nullptr; });
      if (job_ == nullptr) return;  // stopping with nothing queued
      job = std::move(job_);
    }
    Result<SaveInfo> r = save_with_status(*async_comm_, *job->state, job->path, job->options,
                                          std::move(job->incoming));
    if (job->waves) job->waves->finish();  // the caller's thread stops copying, if it has not
    if (r.ok() && job->on_commit) {
      Status s = job->on_commit(*async_comm_);
      if (!s.ok()) r = std::move(s).error();
    }
    job->future->set_done(std::move(r));
  }
}

}  // namespace dsd::checkpoint

#include "core/checkpoint/async_save.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <fmt/ranges.h>

#include <cstring>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/pool.h"

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
  size_t storage = 0;  // index into the unique storages
};

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

struct AsyncCheckpointer::Job {
  DictPtr state;
  std::string path;
  SaveOptions options;
  OnCommit on_commit;
  Status incoming;
  std::shared_ptr<SaveFuture> future;
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
}

uint64_t AsyncCheckpointer::staged_bytes() const {
  uint64_t n = 0;
  if (staging_) {
    for (const at::Tensor& b : staging_->buffers) n += static_cast<uint64_t>(b.numel());
  }
  return n;
}

Result<DictPtr> AsyncCheckpointer::stage(const Dict& state_dict) {
  DictPtr staged = deep_copy(state_dict);
  Value root(staged);
  // Unique storages and the structure key.
  std::vector<Source> sources;
  std::vector<const c10::StorageImpl*> storages;
  std::unordered_map<const c10::StorageImpl*, size_t> storage_index;
  std::string structure;
  for_each_tensor(root, [&](TensorValue& tv) {
    const at::Tensor& t = tv.tensor;
    size_t idx = SIZE_MAX;
    if (t.defined() && t.has_storage() && t.storage().data() != nullptr) {
      const c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
      auto [it, fresh] = storage_index.emplace(impl, storages.size());
      if (fresh) storages.push_back(impl);
      idx = it->second;
    }
    sources.push_back({t, idx});
    structure += fmt::format("{}|{}|{}|{}|{}|{}|{}|{};", static_cast<int>(t.scalar_type()),
                             fmt::join(t.sizes(), ","), fmt::join(t.strides(), ","),
                             t.storage_offset(), idx,
                             idx == SIZE_MAX ? 0 : t.storage().nbytes(), t.device().str(),
                             (t.is_conj() ? 1 : 0) + (t.is_neg() ? 2 : 0));
  });

  if (!staging_ || staging_->structure != structure) {
    staging_.reset();  // another structure: free the old buffers here, on the caller's thread
    auto s = std::make_unique<Staging>();
    s->structure = structure;
    const bool pin = at::globalContext().hasCUDA();
    TRY(torch_call(Code::kOutOfMemory, "allocating the async staging buffers", [&] {
      for (const c10::StorageImpl* impl : storages) {
        s->buffers.push_back(at::empty({static_cast<int64_t>(impl->nbytes())},
                                       at::TensorOptions().dtype(at::kByte).pinned_memory(pin)));
        ++allocations_;
      }
      for (const Source& src : sources) {
        const at::Tensor& t = src.tensor;
        const auto opts = at::TensorOptions().dtype(t.dtype());
        at::Tensor view;
        if (src.storage == SIZE_MAX) {
          view = at::empty(t.sizes(), opts);  // empty or storage-less: nothing to copy
        } else {
          auto* base = static_cast<char*>(s->buffers[src.storage].data_ptr());
          view = at::from_blob(base + t.storage_offset() * t.element_size(), t.sizes(), t.strides(), opts);
        }
        if (t.is_conj()) view = view.conj();
        if (t.is_neg()) view = view._neg_view();
        s->views.push_back(view);
      }
    }));
    staging_ = std::move(s);
  }

  // Copy every unique storage once, in pieces spread over a few threads.
  struct Piece {
    size_t storage;
    uint64_t offset, len;
  };
  std::vector<Piece> pieces;
  std::vector<const at::Tensor*> first_user(storages.size(), nullptr);
  for (const Source& src : sources) {
    if (src.storage != SIZE_MAX && first_user[src.storage] == nullptr) first_user[src.storage] = &src.tensor;
  }
  for (size_t i = 0; i < storages.size(); ++i) {
    const uint64_t n = storages[i]->nbytes();
    if (first_user[i]->device().is_cpu()) {
      for (uint64_t off = 0; off < n; off += kCopyPiece) pieces.push_back({i, off, std::min(kCopyPiece, n - off)});
    } else {
      TRY(torch_call(Code::kDevice, "copying a device tensor to the staging buffer", [&] {
        const at::Tensor& t = *first_user[i];
        at::Tensor src = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(t.device()));
        src.set_(t.storage(), 0, {static_cast<int64_t>(n)}, {1});
        staging_->buffers[i].copy_(src);
      }));
    }
  }
  TRY(parallel_for(pieces.size(), default_threads(0, 4), [&](size_t k) -> Status {
    const Piece& p = pieces[k];
    std::memcpy(static_cast<char*>(staging_->buffers[p.storage].data_ptr()) + p.offset,
                static_cast<const char*>(storages[p.storage]->data()) + p.offset, p.len);
    return ok();
  }));
  size_t i = 0;
  for_each_tensor(root, [&](TensorValue& tv) {
    tv.tensor = staging_->views[i++];
    tv.read_only = true;
  });
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
  auto job = std::make_unique<Job>();
  auto staged = stage(state_dict);
  if (staged.ok()) {
    job->state = std::move(*staged);
  } else {
    job->state = Dict::make();
    job->incoming = std::move(staged).error();
  }
  job->path = path;
  job->options = options;
  job->on_commit = std::move(on_commit);
  job->future = std::make_shared<SaveFuture>();
  job->future->set_staged();
  in_flight_ = job->future;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
  }
  if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
  cv_.notify_all();
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
    if (r.ok() && job->on_commit) {
      Status s = job->on_commit(*async_comm_);
      if (!s.ok()) r = std::move(s).error();
    }
    job->future->set_done(std::move(r));
  }
}

}  // namespace dsd::checkpoint

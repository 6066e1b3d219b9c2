#include "core/adapters/libtorch.h"

#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"

namespace dsd::libtorch {
namespace {

TensorValue ref(const at::Tensor& t) { return TensorValue{t.detach(), nullptr, false}; }

ListPtr pair(double a, double b) {
  auto l = List::make(/*is_tuple=*/true);
  l->push_back(a);
  l->push_back(b);
  return l;
}

// Python's param_group keys, in Python's order, from libtorch's options.
DictPtr options_dict(BoundOptimizer::Kind kind, torch::optim::OptimizerOptions& base) {
  auto d = Dict::make();
  using K = BoundOptimizer::Kind;
  switch (kind) {
    case K::kAdam:
    case K::kAdamW: {
      double lr, eps, wd;
      bool amsgrad;
      std::tuple<double, double> betas;
      if (kind == K::kAdam) {
        auto& o = static_cast<torch::optim::AdamOptions&>(base);
        lr = o.lr(), eps = o.eps(), wd = o.weight_decay(), amsgrad = o.amsgrad(), betas = o.betas();
      } else {
        auto& o = static_cast<torch::optim::AdamWOptions&>(base);
        lr = o.lr(), eps = o.eps(), wd = o.weight_decay(), amsgrad = o.amsgrad(), betas = o.betas();
      }
      d->append_unique("lr", lr);
      d->append_unique("betas", pair(std::get<0>(betas), std::get<1>(betas)));
      d->append_unique("eps", eps);
      d->append_unique("weight_decay", wd);
      d->append_unique("amsgrad", amsgrad);
      d->append_unique("maximize", false);
      d->append_unique("foreach", Value());
      d->append_unique("capturable", false);
      d->append_unique("differentiable", false);
      d->append_unique("fused", Value());
      d->append_unique("decoupled_weight_decay", kind == K::kAdamW);
      break;
    }
    case K::kSgd: {
      auto& o = static_cast<torch::optim::SGDOptions&>(base);
      d->append_unique("lr", o.lr());
      d->append_unique("momentum", o.momentum());
      d->append_unique("dampening", o.dampening());
      d->append_unique("weight_decay", o.weight_decay());
      d->append_unique("nesterov", o.nesterov());
      d->append_unique("maximize", false);
      d->append_unique("foreach", Value());
      d->append_unique("differentiable", false);
      d->append_unique("fused", Value());
      break;
    }
    case K::kAdagrad: {
      auto& o = static_cast<torch::optim::AdagradOptions&>(base);
      d->append_unique("lr", o.lr());
      d->append_unique("lr_decay", o.lr_decay());
      d->append_unique("eps", o.eps());
      d->append_unique("weight_decay", o.weight_decay());
      d->append_unique("initial_accumulator_value", o.initial_accumulator_value());
      d->append_unique("foreach", Value());
      d->append_unique("maximize", false);
      d->append_unique("differentiable", false);
      d->append_unique("fused", Value());
      break;
    }
    case K::kRmsprop: {
      auto& o = static_cast<torch::optim::RMSpropOptions&>(base);
      d->append_unique("lr", o.lr());
      d->append_unique("momentum", o.momentum());
      d->append_unique("alpha", o.alpha());
      d->append_unique("eps", o.eps());
      d->append_unique("centered", o.centered());
      d->append_unique("weight_decay", o.weight_decay());
      d->append_unique("capturable", false);
      d->append_unique("foreach", Value());
      d->append_unique("maximize", false);
      d->append_unique("differentiable", false);
      break;
    }
  }
  return d;
}

std::optional<double> number(const Dict& d, std::string_view key) {
  const Value* v = d.find(key);
  if (v == nullptr) return std::nullopt;
  if (const double* x = v->if_double()) return *x;
  if (const int64_t* i = v->if_int()) return static_cast<double>(*i);
  if (const TensorValue* t = v->if_tensor()) return t->tensor.item<double>();
  return std::nullopt;
}

std::optional<bool> boolean(const Dict& d, std::string_view key) {
  const Value* v = d.find(key);
  if (v == nullptr) return std::nullopt;
  if (const bool* b = v->if_bool()) return *b;
  return std::nullopt;
}

std::optional<std::tuple<double, double>> betas(const Dict& d) {
  const Value* v = d.find("betas");
  const List* l = v != nullptr ? v->if_list() : nullptr;
  if (l == nullptr || l->size() != 2) return std::nullopt;
  auto num = [](const Value& x) -> std::optional<double> {
    if (const double* f = x.if_double()) return *f;
    if (const int64_t* i = x.if_int()) return static_cast<double>(*i);
    return std::nullopt;
  };
  auto a = num((*l)[0]);
  auto b = num((*l)[1]);
  if (!a || !b) return std::nullopt;
  return std::make_tuple(*a, *b);
}

void apply_options(BoundOptimizer::Kind kind, const Dict& d, torch::optim::OptimizerOptions& base) {
  using K = BoundOptimizer::Kind;
  auto set = [&](auto& o) {
    if (auto v = number(d, "lr")) o.lr(*v);
    if (auto v = number(d, "weight_decay")) o.weight_decay(*v);
  };
  switch (kind) {
    case K::kAdam: {
      auto& o = static_cast<torch::optim::AdamOptions&>(base);
      set(o);
      if (auto v = number(d, "eps")) o.eps(*v);
      if (auto v = boolean(d, "amsgrad")) o.amsgrad(*v);
      if (auto v = betas(d)) o.betas(*v);
      break;
    }
    case K::kAdamW: {
      auto& o = static_cast<torch::optim::AdamWOptions&>(base);
      set(o);
      if (auto v = number(d, "eps")) o.eps(*v);
      if (auto v = boolean(d, "amsgrad")) o.amsgrad(*v);
      if (auto v = betas(d)) o.betas(*v);
      break;
    }
    case K::kSgd: {
      auto& o = static_cast<torch::optim::SGDOptions&>(base);
      set(o);
      if (auto v = number(d, "momentum")) o.momentum(*v);
      if (auto v = number(d, "dampening")) o.dampening(*v);
      if (auto v = boolean(d, "nesterov")) o.nesterov(*v);
      break;
    }
    case K::kAdagrad: {
      auto& o = static_cast<torch::optim::AdagradOptions&>(base);
      set(o);
      if (auto v = number(d, "lr_decay")) o.lr_decay(*v);
      if (auto v = number(d, "eps")) o.eps(*v);
      if (auto v = number(d, "initial_accumulator_value")) o.initial_accumulator_value(*v);
      break;
    }
    case K::kRmsprop: {
      auto& o = static_cast<torch::optim::RMSpropOptions&>(base);
      set(o);
      if (auto v = number(d, "momentum")) o.momentum(*v);
      if (auto v = number(d, "alpha")) o.alpha(*v);
      if (auto v = number(d, "eps")) o.eps(*v);
      if (auto v = boolean(d, "centered")) o.centered(*v);
      break;
    }
  }
}

Value step_value(int64_t step) { return Value(TensorValue{at::scalar_tensor(static_cast<double>(step), at::kFloat), nullptr, false}); }

at::Tensor tensor_or(const Dict& d, std::string_view key, const at::Tensor& fallback) {
  const Value* v = d.find(key);
  const TensorValue* t = v != nullptr ? v->if_tensor() : nullptr;
  return t != nullptr ? t->tensor : fallback;
}

int64_t step_of(const Dict& d, int64_t fallback) {
  auto s = number(d, "step");
  return s ? static_cast<int64_t>(*s) : fallback;
}

}  // namespace

Status register_module(Model& model, torch::nn::Module& module) {
  return torch_call(Code::kInternal, "registering a torch::nn::Module", [&]() -> Status {
    for (const auto& item : module.named_modules("", /*include_self=*/true)) {
      const std::string prefix = item.key().empty() ? "" : item.key() + ".";
      for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
        TRY(model.add_parameter(prefix + p.key(), ref(p.value()), p.value().requires_grad()));
      }
      for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
        TRY(model.add_buffer(prefix + b.key(), ref(b.value()), /*persistent=*/true));
      }
    }
    return ok();
  });
}

Result<std::unique_ptr<BoundOptimizer>> BoundOptimizer::bind(torch::optim::Optimizer& optimizer) {
  Kind kind;
  if (dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr) kind = Kind::kAdamW;
  else if (dynamic_cast<torch::optim::Adam*>(&optimizer) != nullptr) kind = Kind::kAdam;
  else if (dynamic_cast<torch::optim::SGD*>(&optimizer) != nullptr) kind = Kind::kSgd;
  else if (dynamic_cast<torch::optim::Adagrad*>(&optimizer) != nullptr) kind = Kind::kAdagrad;
  else if (dynamic_cast<torch::optim::RMSprop*>(&optimizer) != nullptr) kind = Kind::kRmsprop;
  else return Error(Code::kUnsupported, "only Adam, AdamW, SGD, Adagrad and RMSprop optimizers are supported");
  auto bound = std::unique_ptr<BoundOptimizer>(new BoundOptimizer(optimizer, kind));
  for (auto& group : optimizer.param_groups()) {
    std::vector<TensorValue> params;
    for (const at::Tensor& p : group.params()) {
      params.push_back(ref(p));
      bound->params_.push_back(p);
    }
    TRY(bound->registry_.add_param_group(options_dict(kind, group.options()), std::move(params)));
  }
  for (size_t pid = 0; pid < bound->params_.size(); ++pid) TRY(bound->register_state(pid));
  BoundOptimizer* self = bound.get();
  bound->registry_.set_materialize([self](Optimizer&, std::span<const size_t> missing) {
    return self->materialize(missing);
  });
  return bound;
}

Status BoundOptimizer::register_state(size_t pid) {
  auto& states = optimizer_.state();
  auto it = states.find(params_[pid].unsafeGetTensorImpl());
  if (it == states.end()) return registry_.set_state(pid, nullptr);
  auto st = Dict::make();
  torch::optim::OptimizerParamState& base = *it->second;
  switch (kind_) {
    case Kind::kAdam:
    case Kind::kAdamW: {
      // AdamParamState and AdamWParamState are distinct types with the same fields.
      auto fill = [&](auto& s) {
        st->append_unique("step", step_value(s.step()));
        st->append_unique("exp_avg", ref(s.exp_avg()));
        st->append_unique("exp_avg_sq", ref(s.exp_avg_sq()));
        if (s.max_exp_avg_sq().defined()) st->append_unique("max_exp_avg_sq", ref(s.max_exp_avg_sq()));
      };
      if (kind_ == Kind::kAdam) fill(static_cast<torch::optim::AdamParamState&>(base));
      else fill(static_cast<torch::optim::AdamWParamState&>(base));
      break;
    }
    case Kind::kSgd: {
      auto& s = static_cast<torch::optim::SGDParamState&>(base);
      if (s.momentum_buffer().defined()) st->append_unique("momentum_buffer", ref(s.momentum_buffer()));
      break;
    }
    case Kind::kAdagrad: {
      auto& s = static_cast<torch::optim::AdagradParamState&>(base);
      st->append_unique("step", step_value(s.step()));
      st->append_unique("sum", ref(s.sum()));
      break;
    }
    case Kind::kRmsprop: {
      auto& s = static_cast<torch::optim::RMSpropParamState&>(base);
      st->append_unique("step", step_value(s.step()));
      st->append_unique("square_avg", ref(s.square_avg()));
      if (s.momentum_buffer().defined()) st->append_unique("momentum_buffer", ref(s.momentum_buffer()));
      if (s.grad_avg().defined()) st->append_unique("grad_avg", ref(s.grad_avg()));
      break;
    }
  }
  return registry_.set_state(pid, st->empty() ? nullptr : st);
}

Status BoundOptimizer::materialize(std::span<const size_t> missing) {
  return torch_call(Code::kInternal, "creating libtorch optimizer state", [&]() -> Status {
    auto& states = optimizer_.state();
    for (size_t pid : missing) {
      const at::Tensor& p = params_[pid];
      const size_t g = [&] {
        size_t group = 0;
        while (group + 1 < registry_.groups().size() && registry_.group_begin(group + 1) <= pid) ++group;
        return group;
      }();
      auto& options = optimizer_.param_groups()[g].options();
      auto zeros = [&] { return at::zeros_like(p, at::MemoryFormat::Preserve); };
      std::unique_ptr<torch::optim::OptimizerParamState> state;
      switch (kind_) {
        case Kind::kAdam: {
          auto s = std::make_unique<torch::optim::AdamParamState>();
          s->exp_avg(zeros()).exp_avg_sq(zeros());
          if (static_cast<torch::optim::AdamOptions&>(options).amsgrad()) s->max_exp_avg_sq(zeros());
          state = std::move(s);
          break;
        }
        case Kind::kAdamW: {
          auto s = std::make_unique<torch::optim::AdamWParamState>();
          s->exp_avg(zeros()).exp_avg_sq(zeros());
          if (static_cast<torch::optim::AdamWOptions&>(options).amsgrad()) s->max_exp_avg_sq(zeros());
          state = std::move(s);
          break;
        }
        case Kind::kSgd:
          // libtorch's first step clones the gradient into the buffer; without momentum there
          // is no state at all.
          if (static_cast<torch::optim::SGDOptions&>(options).momentum() != 0) {
            auto s = std::make_unique<torch::optim::SGDParamState>();
            s->momentum_buffer(zeros());
            state = std::move(s);
          }
          break;
        case Kind::kAdagrad:
          continue;  // Adagrad creates its state in its constructor
        case Kind::kRmsprop: {
          auto& o = static_cast<torch::optim::RMSpropOptions&>(options);
          auto s = std::make_unique<torch::optim::RMSpropParamState>();
          s->square_avg(zeros());
          if (o.momentum() > 0) s->momentum_buffer(zeros());
          if (o.centered()) s->grad_avg(zeros());
          state = std::move(s);
          break;
        }
      }
      if (state == nullptr) continue;
      states[p.unsafeGetTensorImpl()] = std::move(state);
      TRY(register_state(pid));
    }
    return ok();
  });
}

Status BoundOptimizer::apply() {
  return torch_call(Code::kInternal, "writing loaded state into a libtorch optimizer", [&]() -> Status {
    auto& groups = optimizer_.param_groups();
    for (size_t g = 0; g < groups.size(); ++g) apply_options(kind_, *registry_.groups()[g].options, groups[g].options());
    auto& states = optimizer_.state();
    for (size_t pid = 0; pid < params_.size(); ++pid) {
      void* key = params_[pid].unsafeGetTensorImpl();
      const DictPtr& loaded = registry_.state(pid);
      if (loaded == nullptr) {
        states.erase(key);
        continue;
      }
      auto it = states.find(key);
      if (it == states.end()) {
        TRY(materialize(std::span<const size_t>(&pid, 1)));
        it = states.find(key);
        if (it == states.end()) continue;  // a stateless SGD
      }
      const Dict& d = *loaded;
      torch::optim::OptimizerParamState& base = *it->second;
      switch (kind_) {
        case Kind::kAdam:
        case Kind::kAdamW: {
          auto put = [&](auto& s) {
            s.step(step_of(d, s.step()));
            s.exp_avg(tensor_or(d, "exp_avg", s.exp_avg()));
            s.exp_avg_sq(tensor_or(d, "exp_avg_sq", s.exp_avg_sq()));
            s.max_exp_avg_sq(tensor_or(d, "max_exp_avg_sq", s.max_exp_avg_sq()));
          };
          if (kind_ == Kind::kAdam) put(static_cast<torch::optim::AdamParamState&>(base));
          else put(static_cast<torch::optim::AdamWParamState&>(base));
          break;
        }
        case Kind::kSgd: {
          auto& s = static_cast<torch::optim::SGDParamState&>(base);
          s.momentum_buffer(tensor_or(d, "momentum_buffer", s.momentum_buffer()));
          break;
        }
        case Kind::kAdagrad: {
          auto& s = static_cast<torch::optim::AdagradParamState&>(base);
          s.step(step_of(d, s.step()));
          s.sum(tensor_or(d, "sum", s.sum()));
          break;
        }
        case Kind::kRmsprop: {
          auto& s = static_cast<torch::optim::RMSpropParamState&>(base);
          s.step(step_of(d, s.step()));
          s.square_avg(tensor_or(d, "square_avg", s.square_avg()));
          s.momentum_buffer(tensor_or(d, "momentum_buffer", s.momentum_buffer()));
          s.grad_avg(tensor_or(d, "grad_avg", s.grad_avg()));
          break;
        }
      }
    }
    // The registry's copies of step counters now mirror the optimizer again.
    for (size_t pid = 0; pid < params_.size(); ++pid) TRY(register_state(pid));
    return ok();
  });
}

}  // namespace dsd::libtorch

// dsd_model and dsd_optim: the registries a trainer fills, shared by the capi files that use them.
#pragma once

#include <deque>
#include <mutex>
#include <string>

#include "core/statedict/model.h"
#include "core/statedict/optimizer.h"
#include "dsd/dsd.h"

struct dsd_model {
  explicit dsd_model(dsd::Model m) : model(std::move(m)) {}
  dsd::Model model;

  // Canonical FQNs handed out borrowed (dsd_model_canonical_fqn), one copy per name, kept
  // until the model is freed. A const call may add one, hence the mutex.
  mutable std::mutex fqns_mu;
  mutable std::deque<std::string> fqns;
  const char* keep(std::string s) const {
    std::lock_guard<std::mutex> lock(fqns_mu);
    for (const std::string& k : fqns) {
      if (k == s) return k.c_str();
    }
    return fqns.emplace_back(std::move(s)).c_str();
  }
};

struct dsd_optim {
  dsd::Optimizer optim;
};

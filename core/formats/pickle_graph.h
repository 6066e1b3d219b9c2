// Walking an unpickled object graph (internal to formats/): the children of a node, and
// emptying a node so that cycles a hostile pickle built can be broken before destruction.
#pragma once

#include "core/formats/pickle.h"

namespace dsd {

// Calls f(child) for every node `v` holds (keys and values of dicts, an object's callable,
// arguments, state and items, a persistent id's id).
template <class F>
void for_each_child(const PickleValue& v, F&& f) {
  if (const PickleTuple* t = v.if_tuple()) {
    for (const auto& c : t->items) f(c);
  } else if (const PickleList* l = v.if_list()) {
    for (const auto& c : l->items) f(c);
  } else if (const PickleDict* d = v.if_dict()) {
    for (const auto& [k, c] : d->items) {
      f(k);
      f(c);
    }
  } else if (const PickleSet* s = v.if_set()) {
    for (const auto& c : s->items) f(c);
  } else if (const PickleObject* o = v.if_object()) {
    f(o->callable);
    f(o->args);
    f(o->kwargs);
    if (o->state) f(*o->state);
    for (const auto& c : o->list_items) f(c);
    for (const auto& [k, c] : o->dict_items) {
      f(k);
      f(c);
    }
  } else if (const PicklePersistentId* p = v.if_persistent_id()) {
    f(p->id);
  }
}

// Whether `v` is a kind that can hold other nodes.
bool has_children(const PickleValue& v);
// Drops every child of `v` (the node stays, empty).
void clear_children(const PickleValue& v);

}  // namespace dsd

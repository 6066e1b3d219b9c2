#include "core/formats/pickle_graph.h"

namespace dsd {

bool has_children(const PickleValue& v) {
  using K = PickleValue::Kind;
  switch (v.kind()) {
    case K::kTuple:
    case K::kList:
    case K::kDict:
    case K::kSet:
    case K::kObject:
    case K::kPersistentId: return true;
    default: return false;
  }
}

void clear_children(const PickleValue& v) {
  if (PickleTuple* t = v.if_tuple()) t->items.clear();
  if (PickleList* l = v.if_list()) l->items.clear();
  if (PickleDict* d = v.if_dict()) d->items.clear();
  if (PickleSet* s = v.if_set()) s->items.clear();
  if (PickleObject* o = v.if_object()) {
    o->args = PickleValue();
    o->kwargs = PickleValue();
    o->state.reset();
    o->list_items.clear();
    o->dict_items.clear();
  }
  if (PicklePersistentId* p = v.if_persistent_id()) p->id = PickleValue();
}

}  // namespace dsd

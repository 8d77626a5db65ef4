// A C ABI over libtorch's c10d process groups, so Rust can use the same
// ProcessGroupGloo / ProcessGroupNCCL that torch.distributed uses. Every call
// catches C++ exceptions and hands their message back through `err` (malloc'd;
// the caller frees it with sana_c10d_free_string).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SANA_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct sana_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

struct sana_work {
  c10::intrusive_ptr<c10d::Work> work;
};

namespace {

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// c10's exception messages carry a C++ backtrace after the first line; the
// first part is what a user needs.
std::string message(const std::exception& e) {
  if (auto* ce = dynamic_cast<const c10::Error*>(&e)) {
    return ce->what_without_backtrace();
  }
  return e.what();
}

template <typename F>
auto guarded(char** err, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    *err = dup(message(e));
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return decltype(f()){};
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp::SUM;
    case 1: return c10d::ReduceOp::MAX;
    case 2: return c10d::ReduceOp::MIN;
    case 3: return c10d::ReduceOp::PRODUCT;
    case 4: return c10d::ReduceOp::AVG;
    default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

sana_work* wrap(c10::intrusive_ptr<c10d::Work> w) { return new sana_work{std::move(w)}; }

}  // namespace

extern "C" {

void sana_c10d_free_string(char* s) { std::free(s); }

int sana_c10d_has_nccl() {
#ifdef SANA_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// backend: 0 = Gloo, 1 = NCCL. Rank 0 hosts the TCPStore at master:port and
// waits for all ranks; `local_host` (may be null) is the address Gloo binds.
sana_pg* sana_c10d_new(int backend, const char* master, uint16_t port, int rank, int world,
                       int64_t timeout_ms, const char* local_host, const char* prefix,
                       char** err) {
  return guarded(err, [&]() -> sana_pg* {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master), so);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix ? prefix : "sana"), tcp);
    c10::intrusive_ptr<c10d::Backend> b;
    if (backend == 0) {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      if (local_host && *local_host) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(local_host));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      b = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    } else if (backend == 1) {
#ifdef SANA_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      b = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error("this build has no NCCL (nccl.h was not found at build time)");
#endif
    } else {
      throw std::invalid_argument("unknown backend " + std::to_string(backend));
    }
    return new sana_pg{store, b, timeout};
  });
}

void sana_c10d_free(sana_pg* pg) { delete pg; }

sana_work* sana_c10d_all_reduce(sana_pg* pg, at::Tensor* t, int op, char** err) {
  return guarded(err, [&]() -> sana_work* {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    o.timeout = pg->timeout;
    return wrap(pg->backend->allreduce(ts, o));
  });
}

sana_work* sana_c10d_broadcast(sana_pg* pg, at::Tensor* t, int root, char** err) {
  return guarded(err, [&]() -> sana_work* {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = pg->timeout;
    return wrap(pg->backend->broadcast(ts, o));
  });
}

// `out` holds world × numel(input) elements: every rank's input, in rank order.
sana_work* sana_c10d_all_gather(sana_pg* pg, at::Tensor* out, at::Tensor* input, char** err) {
  return guarded(err, [&]() -> sana_work* {
    c10d::AllgatherOptions o;
    o.timeout = pg->timeout;
    return wrap(pg->backend->_allgather_base(*out, *input, o));
  });
}

// `input` holds world × numel(out) elements; rank r gets the reduction of part r.
sana_work* sana_c10d_reduce_scatter(sana_pg* pg, at::Tensor* out, at::Tensor* input, int op,
                                    char** err) {
  return guarded(err, [&]() -> sana_work* {
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(op);
    o.timeout = pg->timeout;
    return wrap(pg->backend->_reduce_scatter_base(*out, *input, o));
  });
}

sana_work* sana_c10d_barrier(sana_pg* pg, char** err) {
  return guarded(err, [&]() -> sana_work* {
    c10d::BarrierOptions o;
    o.timeout = pg->timeout;
    return wrap(pg->backend->barrier(o));
  });
}

// Waits for the collective (at most timeout_ms; ≤ 0: the group's timeout).
// Returns 1 on success, 0 with `err` set otherwise.
int sana_c10d_wait(sana_work* w, int64_t timeout_ms, char** err) {
  return guarded(err, [&]() -> int {
    bool ok = timeout_ms > 0 ? w->work->wait(std::chrono::milliseconds(timeout_ms))
                             : w->work->wait();
    if (!ok) throw std::runtime_error("collective did not complete");
    return 1;
  });
}

int sana_c10d_is_completed(sana_work* w) {
  try {
    return w->work->isCompleted() ? 1 : 0;
  } catch (...) {
    return 1;  // finished, with an error that wait() reports
  }
}

void sana_c10d_work_free(sana_work* w) { delete w; }

}  // extern "C"

// vhost::Device: the control path (one validated method per vhost operation) and the ring
// lifecycle on the workers: start when a ring has everything it needs, stop on
// GET_VRING_BASE / disable / reset / a broken protocol.
#include "vhostkit/vhost/device.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <numeric>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "ring_map.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

namespace {

// handle_queue calls per wake-up (each handles the backend's own batch of chains): one busy ring
// cannot starve the other rings and fds on the same worker.
constexpr int kHandleBudget = 16;

std::string bit_list(std::uint64_t bits) {
  std::string s;
  for (unsigned b = 0; b < 64; ++b) {
    if (bits & (std::uint64_t{1} << b)) {
      if (!s.empty()) s += ',';
      s += std::to_string(b);
    }
  }
  return s;
}

std::uint64_t errors_total(const virtq::DeviceQueue& vq) noexcept {
  const auto& e = vq.errors();
  return std::accumulate(e.begin(), e.end(), std::uint64_t{0});
}

Result<> set_nonblocking(int fd, std::string_view what, std::uint32_t index) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return fail_errno(fmt::format("vring {}: {} fd {} is unusable", index, what, fd));
  }
  return {};
}

bool ranges_overlap(std::uint64_t a, std::uint64_t alen, std::uint64_t b, std::uint64_t blen) {
  // Half-open ranges, written without a + len (which a peer can make wrap).
  if (alen == 0 || blen == 0) return false;
  return a <= b ? b - a < alen : a - b < blen;
}

}  // namespace

struct Device::Impl {
  Impl(DeviceBackend& b, DeviceOptions o) : backend(b), opts(std::move(o)) {
    const std::size_t nworkers =
        opts.cpus.empty() ? std::max<std::size_t>(1, opts.unpinned_workers) : opts.cpus.size();
    for (std::size_t i = 0; i < nworkers; ++i) {
      Worker::Options wo;
      wo.name = nworkers == 1 ? opts.name : opts.name + std::to_string(i);
      if (!opts.cpus.empty()) wo.cpu = opts.cpus[i];
      wo.mode = opts.mode;
      wo.adaptive_spin_us = opts.adaptive_spin_us;
      workers.push_back(std::make_unique<Worker>(std::move(wo)));
    }
    const std::uint16_t n = backend.num_queues();
    for (std::uint16_t i = 0; i < n; ++i) {
      queues.push_back(std::make_unique<Queue>());
      queues.back()->index_ = i;
    }
  }

  DeviceBackend& backend;
  DeviceOptions opts;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::unique_ptr<Queue>> queues;
  memory::GuestMemory mem;
  std::unique_ptr<memory::DirtyLog> log;
  bool owner = false;
  std::uint64_t extra_offered = 0;
  std::uint64_t acked = 0;
  std::atomic<bool> broken{false};

  std::uint64_t offered() const noexcept { return backend.features() | extra_offered; }

  Worker& worker_of(std::uint32_t index) {
    const std::uint32_t per = std::max<std::uint32_t>(1, opts.queues_per_worker);
    return *workers[(index / per) % workers.size()];
  }

  Result<> need_owner(std::string_view op) const {
    if (!owner) return fail(Errc::bad_state, fmt::format("{} before SET_OWNER", op));
    return {};
  }

  // The vring index check, for every ring request; each names its request and the index.
  Result<Queue*> ring(std::string_view op, std::uint32_t index) {
    if (auto r = need_owner(op); !r) return std::unexpected(r.error());
    return any_ring(op, index);
  }

  // The ring, owner or not (notification fds, stopping a ring: see set_vring_call and
  // get_vring_base).
  Result<Queue*> any_ring(std::string_view op, std::uint32_t index) {
    if (index >= queues.size()) {
      return fail(Errc::out_of_range,
                  fmt::format("{}: vring index {} out of range (device has {} queues)", op, index,
                              queues.size()));
    }
    return queues[index].get();
  }

  // Keeps q.mapped the translation of q's addresses and size into the current table: called
  // whenever one of the three changes, so a start never translates again.
  void map_ring(Queue& q) {
    if (q.num == 0 || !q.has_addr || mem.region_count() == 0) {
      q.mapped = Queue::unmapped();
      return;
    }
    q.mapped = translate_ring(mem, q.addr, q.num, q.index_);
  }

  // --- on the worker ---------------------------------------------------------------------

  void set_log_hook(Queue& q, const MappedRing& r) VHOSTKIT_REQUIRES(q.worker_role_) {
    q.mem = &mem;
    q.log_used = q.addr.log_used();
    q.used_log_gpa = r.used_gpa;
  }

  Result<> start_on_worker(Queue& q, Worker& w, const MappedRing& r)
      VHOSTKIT_REQUIRES(q.worker_role_) {
    if (q.started()) return {};
    q.vq_.attach(&mem, r.parts, acked, static_cast<std::uint16_t>(q.base));
    if (!q.vq_.broken() && q.vq_.used_idx() != q.vq_.last_avail_idx()) {
      // The driver restarted the ring at a base that is not where the used ring stands. DPDK's
      // virtio-user does this when it reconnects to a restarted back-end (base 0, its ring and
      // indices kept); QEMU reads the used index and sends that. Resume from the used index, as
      // DPDK's vhost library does: every chain before it was answered, and one between it and
      // the base was taken by a device that is gone, so it is served again (a tx frame may go
      // out twice; an rx buffer is simply filled).
      spdlog::warn("vhost {}: vring {} base {} but used index {}; resuming from the used index",
                   opts.name, q.index_, q.base, q.vq_.used_idx());
      q.vq_.attach(&mem, r.parts, acked, q.vq_.used_idx());
    }
    q.errors_seen = errors_total(q.vq_);
    q.broken_.store(false, std::memory_order_relaxed);
    q.rekick_pending = false;
    set_log_hook(q, r);
    if (q.kick) {
      // The worker runs its handlers and pollers: they act as the queue's worker.
      auto id = w.watch(q.kick.get(), [this, &q] {
        q.worker_role_.assume();
        on_kick(q);
      });
      if (!id) {
        q.vq_.detach();
        return std::unexpected(id.error());
      }
      q.watch_id = *id;
    }
    const bool polled = !q.kick || opts.mode != PollMode::event;
    if (polled) {
      q.vq_.disable_notifications();
      q.poller_id = w.add_poller(Worker::Poller{[this, &q] {
                                                  q.worker_role_.assume();
                                                  return poll_queue(q);
                                                },
                                                [this, &q](bool enable) {
                                                  q.worker_role_.assume();
                                                  return arm_queue(q, enable);
                                                }});
    }
    q.started_.store(true, std::memory_order_release);
    backend.queue_started(q, w);
    // Chains made available before the kick was watched (a restart from a base) are served now
    // instead of waiting for a kick that was already spent.
    if (!polled) serve_event(q);
    return {};
  }

  void stop_on_worker(Queue& q, Worker& w) VHOSTKIT_REQUIRES(q.worker_role_) {
    if (!q.started()) return;
    if (q.watch_id != 0) w.unwatch(std::exchange(q.watch_id, 0));
    if (q.poller_id != 0) w.remove_poller(std::exchange(q.poller_id, 0));
    backend.queue_stopped(q, w);
    q.base = q.vq_.last_avail_idx();
    q.vq_.detach();
    q.mem = nullptr;
    q.log_used = false;
    q.rekick_pending = false;
    // Release: the control thread that sees started()==false also sees base and the detach.
    q.started_.store(false, std::memory_order_release);
  }

  void mark_broken(Queue& q, std::string_view why) VHOSTKIT_REQUIRES(q.worker_role_) {
    stop_on_worker(q, worker_of(q.index_));
    q.broken_.store(true, std::memory_order_release);
    broken.store(true, std::memory_order_release);
    if (!q.broken_logged) {
      q.broken_logged = true;
      spdlog::error(
          "vhost {}: vring {} broken ({}); the ring is stopped until the driver resets it",
          opts.name, q.index_, why);
    }
    if (q.err) {
      const std::uint64_t one = 1;
      [[maybe_unused]] auto n = ::write(q.err.get(), &one, sizeof one);
    }
  }

  // After handler calls: bad-chain counters into stats, and a broken ring stopped.
  // Returns false if the ring was stopped.
  bool account(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    const std::uint64_t total = errors_total(q.vq_);
    if (total != q.errors_seen) {
      q.stats_.add(q.stats_.errors, total - q.errors_seen);
      q.errors_seen = total;
    }
    if (!q.vq_.broken()) return true;
    const auto& e = q.vq_.errors();
    std::string_view why = "queue marked broken";
    for (auto c : {virtq::ChainError::avail_idx_runaway, virtq::ChainError::head_out_of_range}) {
      if (e[static_cast<std::size_t>(c)] != 0) why = virtq::to_string(c);
    }
    mark_broken(q, why);
    return false;
  }

  // Processes up to the budget; returns the number of handle_queue calls that found work.
  int serve_budget(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    int n = 0;
    while (n < kHandleBudget && q.started() && backend.handle_queue(q)) ++n;
    return n;
  }

  // Event mode: serve with notifications off, then re-enable and re-check the race window.
  void serve_event(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    q.vq_.disable_notifications();
    for (;;) {
      const int n = serve_budget(q);
      if (!account(q) || !q.started()) return;
      if (n == kHandleBudget) {
        // Out of budget with work left: come back after the other fds on this worker, by
        // kicking ourselves. Notifications stay off meanwhile; the driver need not kick.
        q.rekick_pending = true;
        const std::uint64_t one = 1;
        [[maybe_unused]] auto w = ::write(q.kick.get(), &one, sizeof one);
        return;
      }
      if (!q.vq_.enable_notifications()) return;
      q.vq_.disable_notifications();  // chains arrived before the driver saw the flag
    }
  }

  void on_kick(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    std::uint64_t v = 0;
    const ssize_t r = ::read(q.kick.get(), &v, sizeof v);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
      // Readable forever but yields nothing (a hung-up pipe, a socket): it would spin the worker.
      mark_broken(q, "kick fd hung up or unreadable");
      return;
    }
    if (q.rekick_pending) {
      q.rekick_pending = false;
    } else {
      q.stats_.add(q.stats_.kicks);
    }
    if (q.poller_id != 0) {
      // Busy/adaptive: the poller owns notification state; serve once, leave them off.
      serve_budget(q);
      account(q);
      return;
    }
    serve_event(q);
  }

  bool poll_queue(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    if (!q.started()) return false;
    const int n = serve_budget(q);
    account(q);
    return n > 0;
  }

  bool arm_queue(Queue& q, bool enable) VHOSTKIT_REQUIRES(q.worker_role_) {
    if (!q.started()) return false;
    if (!enable) {
      q.vq_.disable_notifications();
      return false;
    }
    // Without a kick fd nothing could wake us: report "work may come" so the worker keeps spinning.
    if (!q.kick) return true;
    return q.vq_.enable_notifications();
  }

  // --- control thread -------------------------------------------------------------------

  // Everything a ring needs to start but memory.
  bool startable(const Queue& q) const {
    return owner && !q.started() && q.num != 0 && q.has_addr && q.kick_set && q.enabled;
  }

  Result<> try_start(Queue& q) {
    if (!startable(q) || mem.region_count() == 0) return {};
    if (!q.mapped) return std::unexpected(q.mapped.error());
    Worker& w = worker_of(q.index_);
    const MappedRing& r = *q.mapped;
    Result<> res;
    w.run_sync([&] {
      q.worker_role_.assume();  // a work item on the queue's worker
      res = start_on_worker(q, w, r);
    });
    return res;
  }

  Result<> try_start_all() {
    Result<> first;
    for (auto& q : queues) {
      auto r = try_start(*q);
      if (!r && first) first = r;
    }
    return first;
  }

  void stop_ring(Queue& q) {
    if (!q.started()) return;
    Worker& w = worker_of(q.index_);
    w.run_sync([&] {
      q.worker_role_.assume();  // a work item on the queue's worker
      stop_on_worker(q, w);
    });
  }

  // Lets the backend finish requests that hold guest addresses; workers must be parked.
  void quiesce_running() {
    for (auto& q : queues) {
      if (q->started()) backend.quiesce(*q, worker_of(q->index_));
    }
  }

  // Runs fn while every running worker is parked in a work item: nothing translates guest
  // memory meanwhile, so the table can be mutated.
  void with_workers_parked(const std::function<void()>& fn) {
    std::vector<Worker*> running;
    for (auto& w : workers) {
      if (w->running()) running.push_back(w.get());
    }
    if (running.size() <= 1) {
      if (running.empty()) {
        fn();
      } else {
        running[0]->run_sync(fn);
      }
      return;
    }
    struct Park {
      std::mutex mu;
      std::condition_variable cv;
      std::size_t parked = 0;
      bool release = false;
    };
    auto park = std::make_shared<Park>();
    for (Worker* w : running) {
      w->queue_work([park] {
        std::unique_lock lk(park->mu);
        ++park->parked;
        park->cv.notify_all();
        park->cv.wait(lk, [&] { return park->release; });
      });
    }
    {
      std::unique_lock lk(park->mu);
      park->cv.wait(lk, [&] { return park->parked == running.size(); });
    }
    fn();
    {
      std::lock_guard lk(park->mu);
      park->release = true;
    }
    park->cv.notify_all();
  }

  // Ring pointers into the (new) table for a running ring, resuming where it was.
  void reattach(Queue& q, const MappedRing& r) VHOSTKIT_REQUIRES(q.worker_role_) {
    const std::uint16_t last = q.vq_.last_avail_idx();
    q.vq_.attach(&mem, r.parts, acked, last);
    q.errors_seen = errors_total(q.vq_);
    if (q.poller_id != 0) q.vq_.disable_notifications();
    set_log_hook(q, r);
  }

  // The table carries the dirty log only while the front-end asks for logging (LOG_ALL acked,
  // as Linux's vhost gates buffer logging on the feature) and has given a log. Called with the
  // workers parked or none running: a worker sees the log from its next write on.
  void install_log() noexcept {
    const bool all = (acked & virtio::bit(virtio::feature::log_all)) != 0;
    mem.set_dirty_log(all && log ? log.get() : nullptr);
  }

  void reset() noexcept {
    for (auto& q : queues) stop_ring(*q);
    for (auto& w : workers) w->stop();
    for (auto& q : queues) q->reset();
    mem.set_dirty_log(nullptr);
    mem.clear();
    log.reset();
    acked = 0;
    owner = false;
    broken.store(false);
  }
};

Device::Device(DeviceBackend& backend, DeviceOptions opts)
    : impl_(std::make_unique<Impl>(backend, std::move(opts))) {}

Device::~Device() { impl_->reset(); }

Result<> Device::set_owner() {
  Impl& d = *impl_;
  if (d.owner) return fail(Errc::bad_state, "SET_OWNER: the device already has an owner");
  for (std::size_t i = 0; i < d.workers.size(); ++i) {
    if (auto r = d.workers[i]->start(); !r) {
      for (std::size_t j = 0; j < i; ++j) d.workers[j]->stop();
      return r;
    }
  }
  d.owner = true;
  return {};
}

Result<> Device::reset_owner() {
  if (auto r = impl_->need_owner("RESET_OWNER"); !r) return r;
  impl_->reset();
  return {};
}

bool Device::has_owner() const noexcept { return impl_->owner; }

Result<> Device::check_owner(std::string_view request) const { return impl_->need_owner(request); }

std::uint64_t Device::offered_features() const noexcept { return impl_->offered(); }

void Device::add_offered_features(std::uint64_t bits) noexcept { impl_->extra_offered |= bits; }

std::uint64_t Device::features() const noexcept { return impl_->acked; }

Result<> Device::set_features(std::uint64_t features) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("SET_FEATURES"); !r) return r;
  const std::uint64_t extra = features & ~d.offered();
  if (extra != 0) {
    return fail(Errc::unsupported,
                fmt::format("SET_FEATURES 0x{:x}: bits not offered: 0x{:x} (bit {})", features,
                            extra, bit_list(extra)));
  }
  bool any_started = false;
  for (auto& q : d.queues) any_started = any_started || q->started();
  if (any_started) {
    // Live migration toggles LOG_ALL on running rings; nothing else may change under them.
    const std::uint64_t changed = (features ^ d.acked) & ~virtio::bit(virtio::feature::log_all);
    if (changed != 0) {
      return fail(
          Errc::bad_state,
          fmt::format("SET_FEATURES: cannot change bits 0x{:x} while rings are running", changed));
    }
    // QEMU waits for this request's answer before it starts copying memory, so every write
    // after the answer must be logged: the workers are parked while the log is switched, and
    // the next write of each sees it.
    d.with_workers_parked([&] {
      d.acked = features;
      d.install_log();
    });
    return {};
  }
  d.acked = features;
  d.install_log();
  d.backend.set_features(features);
  return {};
}

Result<> Device::set_mem_table(std::vector<memory::RegionFd> regions) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("SET_MEM_TABLE"); !r) return r;
  // A transaction, as Linux's VHOST_SET_MEM_TABLE (this request's equivalent ioctl) is: the
  // whole new table is validated and mapped, and every ring checked against it, before anything
  // changes. A refused table leaves the old one mapped and every ring running on it; what this
  // attempt mapped is unmapped and its fds closed on the way out.
  memory::GuestMemory next;
  for (std::size_t i = 0; i < regions.size(); ++i) {
    if (auto r = next.add_region(regions[i].spec, std::move(regions[i].fd)); !r) {
      return fail(r.error().code, fmt::format("SET_MEM_TABLE region {}: {}", i, r.error().detail),
                  r.error().sys_errno);
    }
  }
  // Every configured ring is translated into the new table once, here. Running rings move to
  // it, and rings waiting only for memory start on it: both must lie inside it. A ring still
  // missing its kick or enable keeps its failed translation, reported when it starts.
  std::vector<Result<MappedRing>> mapped;
  mapped.reserve(d.queues.size());
  for (auto& q : d.queues) {
    if (q->num == 0 || !q->has_addr || next.region_count() == 0) {
      mapped.push_back(Queue::unmapped());
    } else {
      mapped.push_back(translate_ring(next, q->addr, q->num, q->index_));
    }
    const bool now = q->started();
    if ((now || d.startable(*q)) && !mapped.back()) {
      return fail(mapped.back().error().code,
                  fmt::format("SET_MEM_TABLE: the new table does not cover {} ring: {}",
                              now ? "a running" : "a ready", mapped.back().error().detail));
    }
  }
  d.with_workers_parked([&] {
    d.quiesce_running();
    std::swap(d.mem, next);
    d.install_log();
    next.set_dirty_log(nullptr);
    for (std::size_t i = 0; i < d.queues.size(); ++i) {
      Queue& q = *d.queues[i];
      q.worker_role_.assume();  // its worker is parked
      if (q.started()) d.reattach(q, *mapped[i]);
    }
  });
  for (std::size_t i = 0; i < d.queues.size(); ++i) d.queues[i]->mapped = std::move(mapped[i]);
  // `next` (the old table) is unmapped when it goes out of scope: no ring points into it now.
  // Every ready ring was checked against the table above, so a start can fail here only on a
  // system error (watching its kick fd); the table stays installed and that error is returned.
  return d.try_start_all();
}

Result<> Device::add_mem_region(memory::RegionFd region) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("ADD_MEM_REG"); !r) return r;
  Result<> res;
  d.with_workers_parked([&] { res = d.mem.add_region(region.spec, std::move(region.fd)); });
  if (!res) {
    return fail(res.error().code, fmt::format("ADD_MEM_REG: {}", res.error().detail),
                res.error().sys_errno);
  }
  // A new region moves no mapped ring; it may hold one that did not translate before.
  for (auto& q : d.queues) {
    if (!q->mapped) d.map_ring(*q);
  }
  return d.try_start_all();
}

Result<> Device::remove_mem_region(const memory::RegionSpec& spec) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("REM_MEM_REG"); !r) return r;
  for (auto& q : d.queues) {
    if (!q->started()) continue;
    const memory::VringAddr& a = q->addr;
    const std::uint32_t n = q->num;
    if (ranges_overlap(a.desc_user_addr, virtio::desc_table_bytes(n), spec.userspace_addr,
                       spec.size) ||
        ranges_overlap(a.avail_user_addr, virtio::avail_ring_bytes(n), spec.userspace_addr,
                       spec.size) ||
        ranges_overlap(a.used_user_addr, virtio::used_ring_bytes(n), spec.userspace_addr,
                       spec.size)) {
      return fail(Errc::bad_state,
                  fmt::format("REM_MEM_REG: running vring {} lives in region uva 0x{:x}", q->index_,
                              spec.userspace_addr));
    }
  }
  Result<> res;
  d.with_workers_parked([&] {
    d.quiesce_running();
    res = d.mem.remove_region(spec);
  });
  if (!res) return res;
  // No running ring was in the region (refused above); a stopped one may have been.
  for (auto& q : d.queues) {
    if (!q->started()) d.map_ring(*q);
  }
  return res;
}

const memory::GuestMemory& Device::memory() const noexcept { return impl_->mem; }

std::uint16_t Device::num_queues() const noexcept {
  return static_cast<std::uint16_t>(impl_->queues.size());
}

Result<> Device::set_vring_num(std::uint32_t index, std::uint32_t num) {
  auto q = impl_->ring("SET_VRING_NUM", index);
  if (!q) return std::unexpected(q.error());
  if ((*q)->started()) {
    return fail(Errc::bad_state, fmt::format("SET_VRING_NUM: vring {} is running", index));
  }
  if (!virtio::is_valid_queue_size(num)) {
    return fail(Errc::invalid_argument,
                fmt::format("SET_VRING_NUM: vring {} size {} is not a power of two in 1..{}", index,
                            num, kMaxQueueSize));
  }
  (*q)->num = num;
  impl_->map_ring(**q);
  return impl_->try_start(**q);
}

Result<> Device::set_vring_addr(std::uint32_t index, const memory::VringAddr& addr) {
  Impl& d = *impl_;
  auto qr = d.ring("SET_VRING_ADDR", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  auto misaligned = [&](const char* what, std::uint64_t a, std::uint64_t align) {
    return fail(Errc::invalid_argument,
                fmt::format("SET_VRING_ADDR: vring {} {} 0x{:x} is not {}-byte aligned", index,
                            what, a, align));
  };
  if (addr.desc_user_addr % virtio::kDescAlign) return misaligned("desc", addr.desc_user_addr, 16);
  if (addr.avail_user_addr % virtio::kAvailAlign)
    return misaligned("avail", addr.avail_user_addr, 2);
  if (addr.used_user_addr % virtio::kUsedAlign) return misaligned("used", addr.used_user_addr, 4);
  if (q.started()) {
    if (addr.desc_user_addr != q.addr.desc_user_addr ||
        addr.avail_user_addr != q.addr.avail_user_addr ||
        addr.used_user_addr != q.addr.used_user_addr) {
      return fail(
          Errc::bad_state,
          fmt::format("SET_VRING_ADDR: vring {} is running; only the log flag may change", index));
    }
    // The same parts: the ring's translation stands.
    Worker& w = d.worker_of(index);
    const MappedRing& r = *q.mapped;
    w.run_sync([&] {
      q.worker_role_.assume();  // a work item on the queue's worker
      q.addr = addr;
      d.set_log_hook(q, r);
    });
    return {};
  }
  // With the size and memory known, translate now and refuse what does not map; otherwise the
  // translation waits for them.
  if (q.num != 0 && d.mem.region_count() != 0) {
    auto r = translate_ring(d.mem, addr, q.num, index);
    if (!r) return std::unexpected(r.error());
    q.mapped = std::move(r);
  } else {
    q.mapped = Queue::unmapped();
  }
  q.addr = addr;
  q.has_addr = true;
  return d.try_start(q);
}

Result<> Device::set_vring_base(std::uint32_t index, std::uint32_t base) {
  auto q = impl_->ring("SET_VRING_BASE", index);
  if (!q) return std::unexpected(q.error());
  if ((*q)->started()) {
    return fail(Errc::bad_state, fmt::format("SET_VRING_BASE: vring {} is running", index));
  }
  if (base > 0xffff) {
    return fail(Errc::out_of_range,
                fmt::format("SET_VRING_BASE: vring {} base {} does not fit 16 bits", index, base));
  }
  (*q)->base = base;
  return {};
}

// Stopping a ring (GET_VRING_BASE, SET_VRING_ENABLE 0) is answered before SET_OWNER too: no ring
// can run without an owner, so it only reports the base of a stopped ring. DPDK's virtio-user
// resets the device (stops every ring) first thing when it reconnects to a new back-end.
Result<std::uint32_t> Device::get_vring_base(std::uint32_t index) {
  auto qr = impl_->any_ring("GET_VRING_BASE", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  impl_->stop_ring(q);
  // The ring stays stopped until the frontend sends a new kick (vhost-user: "stopped on
  // GET_VRING_BASE, started on kick").
  q.kick.reset();
  q.kick_set = false;
  return q.base;
}

Result<> Device::set_vring_kick(std::uint32_t index, UniqueFd fd) {
  Impl& d = *impl_;
  auto qr = d.ring("SET_VRING_KICK", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  if (fd) {
    if (auto r = set_nonblocking(fd.get(), "kick", index); !r) return r;
  }
  // A new kick fd on a running ring: stop (saving last_avail_idx) and start on the new fd.
  d.stop_ring(q);
  q.kick = std::move(fd);
  q.kick_set = true;
  return d.try_start(q);
}

// Call and err fds are taken before SET_OWNER too: they are eventfds we only ever signal, they
// give the front-end nothing, and reset() closes them with the session. DPDK's virtio-user, when
// it reconnects to a restarted back-end, sends SET_VRING_CALL for every ring first, then
// SET_FEATURES, and no SET_OWNER at all; refusing the calls would leave those rings silent.
Result<> Device::set_vring_call(std::uint32_t index, UniqueFd fd) {
  Impl& d = *impl_;
  auto qr = d.any_ring("SET_VRING_CALL", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  if (fd) {
    if (auto r = set_nonblocking(fd.get(), "call", index); !r) return r;
  }
  // The worker signals q.call: swap it there. The old fd closes here, after the swap.
  d.worker_of(index).run_sync([&] {
    q.worker_role_.assume();  // a work item on the queue's worker
    std::swap(q.call, fd);
  });
  return {};
}

Result<> Device::set_vring_err(std::uint32_t index, UniqueFd fd) {
  Impl& d = *impl_;
  auto qr = d.any_ring("SET_VRING_ERR", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  if (fd) {
    if (auto r = set_nonblocking(fd.get(), "err", index); !r) return r;
  }
  d.worker_of(index).run_sync([&] {
    q.worker_role_.assume();  // a work item on the queue's worker
    std::swap(q.err, fd);
  });
  return {};
}

Result<> Device::set_vring_enable(std::uint32_t index, bool enable) {
  Impl& d = *impl_;
  auto qr = enable ? d.ring("SET_VRING_ENABLE", index) : d.any_ring("SET_VRING_ENABLE", index);
  if (!qr) return std::unexpected(qr.error());
  Queue& q = **qr;
  q.enabled = enable;
  if (!enable) {
    d.stop_ring(q);
    return {};
  }
  return d.try_start(q);
}

Result<> Device::set_log_base(UniqueFd fd, std::uint64_t size, std::uint64_t offset) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("SET_LOG_BASE"); !r) return r;
  auto log = std::make_unique<memory::DirtyLog>();
  if (auto r = log->attach(std::move(fd), size, offset); !r) return r;
  d.with_workers_parked([&] {
    std::swap(d.log, log);
    d.install_log();
  });
  return {};  // the previous log (if any) is unmapped here, after no worker can use it
}

void Device::reset() noexcept { impl_->reset(); }

bool Device::broken() const noexcept { return impl_->broken.load(std::memory_order_acquire); }

Queue& Device::queue(std::uint32_t index) {
  assert(index < impl_->queues.size());
  return *impl_->queues[index];
}

DeviceBackend& Device::backend() noexcept { return impl_->backend; }

Worker& Device::worker_for(std::uint32_t index) { return impl_->worker_of(index); }

std::size_t Device::worker_count() const noexcept { return impl_->workers.size(); }

}  // namespace vhostkit::vhost

// Internal to vhost: vhost::Device's state and its ring lifecycle on the workers, shared by
// device.cc (owner, features, rings) and device_memory.cc (the memory table and the dirty log).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "ring_map.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

namespace detail {

// handle_queue calls per wake-up (each handles the backend's own batch of chains): one busy ring
// cannot starve the other rings and fds on the same worker.
constexpr int kHandleBudget = 16;

inline std::string bit_list(std::uint64_t bits) {
  std::string s;
  for (unsigned b = 0; b < 64; ++b) {
    if (bits & (std::uint64_t{1} << b)) {
      if (!s.empty()) s += ',';
      s += std::to_string(b);
    }
  }
  return s;
}

// Where a packed ring resumes from SET_VRING_BASE's num. Front-ends that carry the avail side
// only leave the used half zero: DPDK's virtio-user and SPDK send 0x8000 for a new ring (avail
// 0 with its wrap counter set), and DPDK's vhost library reads no more than bits 0-15. Read
// literally, used 0 with wrap counter 0 is a lap away from an avail position with its counter
// set (a whole ring in flight, which no device of ours leaves behind at a stop: net answers
// every chain it pops, blk drains before GET_VRING_BASE answers). So a zero used half with the
// avail wrap counter set, or with any avail half it cannot go with, means "every chain
// answered" (used at avail), as those front-ends mean. Any other value (QEMU sends all 32 bits)
// is taken as it is and checked by the ring.
inline virtq::PackedRingBase packed_resume_point(std::uint32_t num_field, std::uint32_t size) {
  const auto b = virtq::PackedRingBase::decode(num_field);
  const auto ext = [size](std::uint16_t pos, bool wrap) {
    return wrap ? std::uint32_t{pos} : std::uint32_t{pos} + size;
  };
  const std::uint32_t a = ext(b.avail_idx, b.avail_wrap);
  const std::uint32_t u = ext(b.used_idx, b.used_wrap);
  const std::uint32_t behind = a >= u ? a - u : a + 2 * size - u;
  const bool sane = b.avail_idx < size && b.used_idx < size && behind <= size;
  if ((num_field >> 16) == 0 && (b.avail_wrap || !sane)) return b.use_avail_for_used();
  return b;
}

inline Result<> set_nonblocking(int fd, std::string_view what, std::uint32_t index) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return fail_errno(fmt::format("vring {}: {} fd {} is unusable", index, what, fd));
  }
  return {};
}

inline bool ranges_overlap(std::uint64_t a, std::uint64_t alen, std::uint64_t b,
                           std::uint64_t blen) {
  // Half-open ranges, written without a + len (which a peer can make wrap).
  if (alen == 0 || blen == 0) return false;
  return a <= b ? b - a < alen : a - b < blen;
}

}  // namespace detail

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
  std::unique_ptr<InflightRegion> inflight;  // set and dropped only with every ring stopped
  bool owner = false;
  std::uint64_t extra_offered = 0;
  std::uint64_t acked = 0;
  // Copies of owner and acked for readers on other threads (has_owner(), features(): a metrics
  // scrape), written wherever those are; the control thread keeps using the plain fields.
  std::atomic<bool> owner_seen{false};
  std::atomic<std::uint64_t> acked_seen{0};
  void set_acked(std::uint64_t f) noexcept {
    acked = f;
    acked_seen.store(f, std::memory_order_relaxed);
  }
  void set_owner(bool o) noexcept {
    owner = o;
    owner_seen.store(o, std::memory_order_relaxed);
  }
  std::atomic<bool> broken{false};

  std::uint64_t offered() const noexcept { return backend.features() | extra_offered; }
  // The layout of every ring, from the acked features (2.8: the packed ring is negotiated for
  // the whole device).
  bool packed() const noexcept { return virtio::has(acked, virtio::feature::ring_packed); }

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
    q.mapped = translate_ring(mem, q.addr, q.num, q.index_, packed());
  }

  // --- on the worker ---------------------------------------------------------------------

  void set_log_hook(Queue& q, const MappedRing& r) VHOSTKIT_REQUIRES(q.worker_role_) {
    q.mem = &mem;
    q.log_used = q.addr.log_used();
    q.used_log_gpa = r.used_gpa;
    q.desc_log_gpa = r.desc_gpa;
    q.device_event_log_gpa = r.device_event_gpa;
    q.logged_used_pos = q.pvq_.base().used_idx;
  }

  // Starts the packed ring from q.base; an error (and the ring left detached) for a base that
  // names no resume point on this ring.
  Result<> attach_packed(Queue& q, const MappedRing& r) VHOSTKIT_REQUIRES(q.worker_role_) {
    const virtq::PackedRingBase b = detail::packed_resume_point(q.base, q.num);
    q.pvq_.attach(&mem, r.packed_parts, acked, b);
    if (!q.pvq_.broken()) return {};
    q.pvq_.detach();
    return fail(
        Errc::invalid_argument,
        fmt::format("vring {}: packed base 0x{:x} (avail {} wrap {}, used {} wrap {}) is no "
                    "resume point on a ring of {}",
                    q.index_, q.base, b.avail_idx, int{b.avail_wrap}, b.used_idx, int{b.used_wrap},
                    q.num));
  }

  Result<> start_on_worker(Queue& q, Worker& w, const MappedRing& r)
      VHOSTKIT_REQUIRES(q.worker_role_) {
    if (q.started()) return {};
    q.packed_ = r.packed;
    if (r.packed) {
      // The packed ring carries no used index in memory to check the base against: its base
      // holds the used position itself (GET_VRING_BASE gave both), so it resumes as it is.
      if (auto a = attach_packed(q, r); !a) return a;
    } else {
      q.vq_.attach(&mem, r.parts, acked, static_cast<std::uint16_t>(q.base));
    }
    if (!r.packed && !q.vq_.broken() && q.vq_.used_idx() != q.vq_.last_avail_idx()) {
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
    // With an inflight region the ring resumes past the heads still in flight there (QEMU sends
    // the used index as the base, as above), and those are resubmitted first. Split rings only:
    // the packed layout is not implemented (the session answers GET_INFLIGHT_FD with no region
    // and refuses SET_INFLIGHT_FD when the packed ring was negotiated).
    auto resume =
        q.start_inflight(inflight && !r.packed ? inflight->split_queue(q.index_) : nullptr);
    if (!resume) {
      q.vq_.detach();
      return std::unexpected(resume.error());
    }
    if (!r.packed && *resume != q.vq_.last_avail_idx()) q.vq_.attach(&mem, r.parts, acked, *resume);
    q.errors_seen = q.visit([](auto& vq) { return vq.error_total(); });
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
        q.pvq_.detach();
        return std::unexpected(id.error());
      }
      q.watch_id = *id;
    }
    const bool polled = !q.kick || opts.mode != PollMode::event;
    if (polled) {
      q.visit([](auto& vq) { vq.disable_notifications(); });
      q.poller_id = w.add_poller(
          Worker::Poller{[this, &q] {
                           q.worker_role_.assume();
                           return poll_queue(q);
                         },
                         [this, &q](bool enable) {
                           q.worker_role_.assume();
                           return arm_queue(q, enable);
                         },
                         [this, &q] { return q.started() && backend.waiting_on_io(q); }});
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
    q.inflight_ = nullptr;  // the device's answers are published: nothing more to record
    q.resubmit_.clear();
    q.base = q.packed_ ? q.pvq_.base().encode() : q.vq_.last_avail_idx();
    q.vq_.detach();
    q.pvq_.detach();
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
    const std::uint64_t total = q.visit([](auto& vq) { return vq.error_total(); });
    if (total != q.errors_seen) {
      q.stats_.add(q.stats_.errors, total - q.errors_seen);
      q.errors_seen = total;
    }
    if (!q.visit([](auto& vq) { return vq.broken(); })) return true;
    const auto& e = q.visit([](auto& vq) -> const auto& { return vq.errors(); });
    std::string_view why = "queue marked broken";
    for (auto c : {virtq::ChainError::avail_idx_runaway, virtq::ChainError::head_out_of_range,
                   virtq::ChainError::chain_unterminated, virtq::ChainError::wrap_state_invalid}) {
      if (e[static_cast<std::size_t>(c)] != 0) why = virtq::to_string(c);
    }
    mark_broken(q, why);
    return false;
  }

  // Processes up to the budget; returns the number of handle_queue calls that found work.
  int serve_budget(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    int n = 0;
    while (n < detail::kHandleBudget && q.started() && backend.handle_queue(q)) ++n;
    return n;
  }

  // Event mode: serve with notifications off, then re-enable and re-check the race window.
  void serve_event(Queue& q) VHOSTKIT_REQUIRES(q.worker_role_) {
    q.visit([](auto& vq) { vq.disable_notifications(); });
    for (;;) {
      const int n = serve_budget(q);
      if (!account(q) || !q.started()) return;
      if (n == detail::kHandleBudget) {
        // Out of budget with work left: come back after the other fds on this worker, by
        // kicking ourselves. Notifications stay off meanwhile; the driver need not kick.
        q.rekick();
        return;
      }
      if (!q.visit([](auto& vq) { return vq.enable_notifications(); })) return;
      // Chains arrived before the driver saw the flag.
      q.visit([](auto& vq) { vq.disable_notifications(); });
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
      q.visit([](auto& vq) { vq.disable_notifications(); });
      return false;
    }
    // Without a kick fd nothing could wake us: report "work may come" so the worker keeps spinning.
    if (!q.kick) return true;
    return q.visit([](auto& vq) { return vq.enable_notifications(); });
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
    if (q.packed_) {
      // Between handler calls every used descriptor is published: base() is the whole state.
      q.pvq_.attach(&mem, r.packed_parts, acked, q.pvq_.base());
    } else {
      const std::uint16_t last = q.vq_.last_avail_idx();
      q.vq_.attach(&mem, r.parts, acked, last);
    }
    q.errors_seen = q.visit([](auto& vq) { return vq.error_total(); });
    if (q.poller_id != 0) q.visit([](auto& vq) { vq.disable_notifications(); });
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
    inflight.reset();
    set_acked(0);
    set_owner(false);
    broken.store(false);
  }
};

}  // namespace vhostkit::vhost

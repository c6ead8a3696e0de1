// vhost::Device: the control path (one validated method per vhost operation) and the ring
// lifecycle on the workers: start when a ring has everything it needs, stop on
// GET_VRING_BASE / disable / reset / a broken protocol. The memory table and the dirty log are
// in device_memory.cc; the state and the worker side in device_impl.h.
#include <cassert>

#include "device_impl.h"

namespace vhostkit::vhost {

using detail::bit_list;
using detail::set_nonblocking;

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
  d.set_owner(true);
  return {};
}

Result<> Device::reset_owner() {
  if (auto r = impl_->need_owner("RESET_OWNER"); !r) return r;
  impl_->reset();
  return {};
}

bool Device::has_owner() const noexcept {
  return impl_->owner_seen.load(std::memory_order_relaxed);
}

Result<> Device::check_owner(std::string_view request) const { return impl_->need_owner(request); }

std::uint64_t Device::offered_features() const noexcept { return impl_->offered(); }

void Device::add_offered_features(std::uint64_t bits) noexcept { impl_->extra_offered |= bits; }

std::uint64_t Device::features() const noexcept {
  return impl_->acked_seen.load(std::memory_order_relaxed);
}

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
      d.set_acked(features);
      d.install_log();
    });
    return {};
  }
  d.set_acked(features);
  d.install_log();
  // Which ring layout the front-end chose is worth a line: it falls back to split silently.
  spdlog::info("vhost {}: features 0x{:x} acked: {} ring{}{}", d.opts.name, features,
               d.packed() ? "packed" : "split",
               virtio::has(features, virtio::feature::in_order) ? ", in order" : "",
               virtio::has(features, virtio::feature::ring_event_idx) ? ", event idx" : "");
  // The layout may have changed (VIRTIO_F_RING_PACKED): every configured ring is translated
  // again for it, and a size the new layout does not allow is reported when the ring starts.
  for (auto& q : d.queues) d.map_ring(*q);
  d.backend.set_features(features);
  return {};
}

std::uint16_t Device::num_queues() const noexcept {
  return static_cast<std::uint16_t>(impl_->queues.size());
}

Result<> Device::set_vring_num(std::uint32_t index, std::uint32_t num) {
  auto q = impl_->ring("SET_VRING_NUM", index);
  if (!q) return std::unexpected(q.error());
  if ((*q)->started()) {
    return fail(Errc::bad_state, fmt::format("SET_VRING_NUM: vring {} is running", index));
  }
  // The sizes the layout of the features acked so far allows: front-ends send SET_FEATURES
  // first (QEMU, DPDK), so this is the layout the ring will run. If the features change
  // afterwards, the ring is translated again for the new layout and a size it does not allow
  // is refused at the start (translate_ring).
  const bool packed = impl_->packed();
  if (!valid_ring_size(num, packed)) {
    return fail(Errc::invalid_argument,
                fmt::format("SET_VRING_NUM: vring {} size {} is not {} in 1..{}", index, num,
                            packed ? "a packed ring size" : "a power of two", kMaxQueueSize));
  }
  (*q)->num = num;
  (*q)->size_seen_.store(num, std::memory_order_relaxed);
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
    auto r = translate_ring(d.mem, addr, q.num, index, d.packed());
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
  if (!impl_->packed()) {
    if (base > 0xffff) {
      return fail(
          Errc::out_of_range,
          fmt::format("SET_VRING_BASE: vring {} base {} does not fit 16 bits", index, base));
    }
  } else if (const std::uint32_t num = (*q)->num; num != 0) {
    // Packed (vhost-user.rst, "Vring descriptor indices for packed virtqueues"): bits 0-14 the
    // next descriptor to read, bit 15 its wrap counter, bits 16-30 and 31 the same for the next
    // used one. Positions past the ring are refused now; whether used is ahead of avail is
    // checked when the ring starts, against the size it then has.
    const auto b = virtq::PackedRingBase::decode(base);
    if (b.avail_idx >= num || b.used_idx >= num) {
      return fail(Errc::out_of_range,
                  fmt::format("SET_VRING_BASE: vring {} packed base 0x{:x} names avail {} and "
                              "used {}, past a ring of {}",
                              index, base, b.avail_idx, b.used_idx, num));
    }
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

Result<> Device::set_inflight(std::string_view request, std::unique_ptr<InflightRegion> region) {
  Impl& d = *impl_;
  if (auto r = d.need_owner(request); !r) return r;
  for (auto& q : d.queues) {
    if (q->started()) {
      return fail(Errc::bad_state,
                  fmt::format("{}: vring {} is running (the inflight region changes only while "
                              "every ring is stopped)",
                              request, q->index_));
    }
  }
  d.inflight = std::move(region);  // the old one is unmapped here: no ring records into it
  return {};
}

const InflightRegion* Device::inflight() const noexcept { return impl_->inflight.get(); }

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

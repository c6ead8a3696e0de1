// Test rig for the net device tests: a guest driver (virtq::DriverQueue per ring) on memfd
// memory that a vhost::Device maps through set_mem_table, the way a vhost-user frontend and
// backend would, with real kick/call eventfds (vhost::testing::GuestRings); and FakePort, an
// in-memory host port.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "testing/guest_rig.h"
#include "vhostkit/net/net_device.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"
#include "vhostkit/virtq/iov.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::net::testing {

using Bytes = std::vector<std::uint8_t>;
namespace nf = virtio::net_feature;
using virtio::bit;

inline constexpr std::uint64_t kBase = bit(virtio::feature::version_1);
inline constexpr std::uint64_t kEventIdx = bit(virtio::feature::ring_event_idx);
inline constexpr std::uint64_t kMrg = bit(nf::mrg_rxbuf);
inline constexpr std::uint64_t kPacked = bit(virtio::feature::ring_packed);
inline constexpr std::uint64_t kInOrder = bit(virtio::feature::in_order);
inline constexpr std::uint64_t kCtrl = bit(nf::ctrl_vq) | bit(nf::ctrl_rx);

using vhost::testing::dup_fd;
using vhost::testing::make_eventfd;
using vhost::testing::wait_fd;

// A host port in memory: frames the device sends are collected in `sent`; frames pushed with
// inject() are handed to recv(); rx_fd is an eventfd readable while frames wait.
class FakePort final : public Port {
 public:
  explicit FakePort(bool vnet, std::uint16_t pairs = 1) : vnet_(vnet), pairs_(pairs) {
    for (std::uint16_t i = 0; i < pairs; ++i) fds_.push_back(make_eventfd());
    rx_.resize(pairs);
  }
  std::string_view kind() const noexcept override { return "fake"; }
  std::string_view ifname() const noexcept override { return "fake0"; }
  std::uint16_t queue_pairs() const noexcept override { return pairs_; }
  int rx_fd(std::uint16_t qp) const noexcept override { return fds_[qp].get(); }
  bool vnet_hdr() const noexcept override { return vnet_; }
  Result<> set_guest_offloads(std::uint64_t f) override {
    offloads_set = f;
    return {};
  }
  bool send(std::uint16_t, std::span<const iovec> pieces) noexcept override {
    Bytes b(virtq::iov_size(pieces));
    virtq::iov_read(pieces, 0, b.data(), b.size());
    std::lock_guard lk(mu_);
    if (refuse_sends) return false;
    sent.push_back(std::move(b));
    return true;
  }
  std::expected<std::size_t, Errc> recv(std::uint16_t qp,
                                        std::span<const iovec> into) noexcept override {
    std::lock_guard lk(mu_);
    ++recv_calls;
    if (fail_reads) return std::unexpected(Errc::system);  // like a TAP whose interface went away
    if (rx_[qp].empty()) return 0;
    Bytes f = std::move(rx_[qp].front());
    rx_[qp].pop_front();
    if (rx_[qp].empty()) {
      std::uint64_t v;
      [[maybe_unused]] auto r = ::read(fds_[qp].get(), &v, sizeof v);
    }
    if (f.size() > virtq::iov_size(into)) return std::unexpected(Errc::too_many);
    return virtq::iov_write(into, 0, f.data(), f.size());
  }
  PortStats stats(std::uint16_t) const noexcept override { return {}; }

  void inject(Bytes frame, std::uint16_t qp = 0) {
    std::lock_guard lk(mu_);
    rx_[qp].push_back(std::move(frame));
    const std::uint64_t one = 1;
    [[maybe_unused]] auto r = ::write(fds_[qp].get(), &one, sizeof one);
  }
  // Makes the rx fd readable without a frame (a failed port stays readable forever).
  void poke(std::uint16_t qp = 0) {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto r = ::write(fds_[qp].get(), &one, sizeof one);
  }
  std::size_t waiting(std::uint16_t qp = 0) {
    std::lock_guard lk(mu_);
    return rx_[qp].size();
  }
  std::vector<Bytes> take_sent() {
    std::lock_guard lk(mu_);
    std::vector<Bytes> out(sent.begin(), sent.end());
    sent.clear();
    return out;
  }

  std::atomic<bool> refuse_sends{false};
  std::atomic<bool> fail_reads{false};
  std::atomic<std::uint64_t> offloads_set{0};
  std::uint64_t recv_calls = 0;  // under mu_

 private:
  bool vnet_;
  std::uint16_t pairs_;
  std::vector<UniqueFd> fds_;
  std::mutex mu_;
  std::vector<std::deque<Bytes>> rx_;
  std::deque<Bytes> sent;
};

// A random Ethernet frame of `len` bytes with distinct destination and source addresses.
inline Bytes random_frame(std::mt19937& rng, std::size_t len) {
  Bytes f(len);
  for (auto& b : f) b = static_cast<std::uint8_t>(rng());
  f[0] = 0x02;  // unicast destination
  f[6] = 0x06;  // unicast source, different from the destination
  return f;
}

inline Bytes mac_swapped(const Bytes& f) {
  Bytes g = f;
  std::copy(f.begin() + 6, f.begin() + 12, g.begin());
  std::copy(f.begin(), f.begin() + 6, g.begin() + 6);
  return g;
}

// The guest: memfd memory, one DriverQueue per device queue, slot-allocated buffers.
//
// The tests name a pair's rings by role: rig queue 2p is pair p's transmitq, 2p+1 its
// receiveq. The device numbers them as the spec does (2p receiveq, 2p+1 transmitq); the
// device_index given to GuestRings is the one place the two meet. The control queue (last) is
// the same on both sides.
class Guest : public vhost::testing::GuestRings {
 public:
  static constexpr std::uint64_t kDataGpa = 0x400000;
  static constexpr std::size_t kSlot = 0x10000;  // 64 KiB per buffer slot

  Guest(std::uint16_t queues, std::uint64_t features, std::uint16_t ring_size = 256)
      : GuestRings("net-test", kDataGpa + std::size_t{queues} * ring_size * kSlot, queues,
                   ring_size, features, [queues](std::uint16_t q) {
                     return q < (queues & ~1u) ? static_cast<std::uint16_t>(q ^ 1u) : q;
                   }) {
    // Each queue owns ring_size slots (the slot index is the token).
    free_slots_.resize(queues);
    for (std::uint16_t q = 0; q < queues; ++q) {
      for (std::uint16_t s = 0; s < ring_size; ++s) free_slots_[q].push_back(ring_size - 1 - s);
    }
  }

  std::size_t hdr_len() const {
    return virtio::net_hdr_size(virtio::has(features(), virtio::feature::version_1),
                                virtio::has(features(), nf::mrg_rxbuf));
  }
  std::uint64_t slot_gpa(std::uint16_t q, std::uint64_t slot) const {
    return kDataGpa + (std::uint64_t{q} * ring_size() + slot) * kSlot;
  }

  std::size_t free_slots(std::uint16_t q) const { return free_slots_[q].size(); }

  // Adds a chain of `out` bytes (device-readable) then `in` writable buffers of the given
  // sizes, all in one slot. Returns the slot, or nullopt when the ring is full.
  std::optional<std::uint16_t> add_raw(std::uint16_t q, const Bytes& out,
                                       std::vector<std::uint32_t> in_sizes = {},
                                       std::size_t out_pieces = 1) {
    if (free_slots_[q].empty()) return std::nullopt;
    const std::uint16_t slot = free_slots_[q].back();
    std::uint64_t gpa = slot_gpa(q, slot);
    std::vector<virtq::DriverQueue::Buffer> outs, ins;
    if (!out.empty()) {
      std::memcpy(host(gpa), out.data(), out.size());
      // Split the readable bytes into out_pieces buffers (with gaps, so they are not one run).
      std::size_t off = 0;
      for (std::size_t i = 0; i < out_pieces; ++i) {
        std::size_t len = i + 1 == out_pieces ? out.size() - off : out.size() / out_pieces;
        outs.push_back({gpa + off, static_cast<std::uint32_t>(len)});
        off += len;
      }
      gpa += (out.size() + 63) & ~std::size_t{63};
    }
    if (out.empty()) gpa += rx_headroom;
    for (auto s : in_sizes) {
      ins.push_back({gpa, s});
      gpa += (s + 63) & ~std::uint64_t{63};
    }
    EXPECT_LE(gpa - slot_gpa(q, slot), kSlot);
    auto h = driver(q).add(outs, ins, slot);
    if (!h) return std::nullopt;
    free_slots_[q].pop_back();
    return slot;
  }

  // Sends a frame on tx queue q (header zeroed, or the given one).
  bool send(std::uint16_t q, const Bytes& frame, std::size_t pieces = 1,
            const Bytes* hdr = nullptr) {
    Bytes out(hdr_len(), 0);
    if (hdr) std::copy(hdr->begin(), hdr->end(), out.begin());
    out.insert(out.end(), frame.begin(), frame.end());
    return add_raw(q, out, {}, pieces).has_value();
  }

  // Posts an rx buffer of `size` writable bytes (optionally split in two descriptors).
  bool post_rx(std::uint16_t q, std::uint32_t size, bool split = false) {
    if (split) return add_raw(q, {}, {size / 2, size - size / 2}).has_value();
    return add_raw(q, {}, {size}).has_value();
  }

  // Device-writable-only chains (rx buffers) start this many bytes into their slot: 64 minus the
  // header's length puts each received frame at the start of a cache line, as DPDK's mbufs do.
  std::uint32_t rx_headroom = 0;

  // Reclaims used entries of queue q, returning them (slots are freed).
  std::vector<virtq::DriverQueue::Used> reclaim(std::uint16_t q) {
    std::vector<virtq::DriverQueue::Used> out;
    while (auto u = driver(q).get_used()) {
      out.push_back(*u);
      free_slots_[q].push_back(static_cast<std::uint16_t>(u->token));
    }
    return out;
  }

  // Reads the bytes of an rx used element (the chain's writable buffers in order).
  Bytes rx_bytes(std::uint16_t q, const virtq::DriverQueue::Used& u,
                 std::vector<std::uint32_t> in_sizes) {
    Bytes b;
    std::uint64_t gpa = slot_gpa(q, u.token) + rx_headroom;
    std::size_t left = u.len;
    for (auto s : in_sizes) {
      const std::size_t k = std::min<std::size_t>(s, left);
      b.insert(b.end(), host(gpa), host(gpa) + k);
      left -= k;
      gpa += (s + 63) & ~std::uint64_t{63};
    }
    return b;
  }

 private:
  std::vector<std::vector<std::uint16_t>> free_slots_;
};

// Receives frames from rx queue q (reassembling mergeable ones) until `count` frames arrived or
// timeout. Each rx buffer was posted with in_sizes; used entries of len 0 are dropped chains.
struct RxFrame {
  Bytes hdr;
  Bytes data;
  std::uint16_t num_buffers = 0;
};

class Receiver {
 public:
  Receiver(Guest& g, std::uint16_t q, std::vector<std::uint32_t> in_sizes)
      : g_(g), q_(q), in_(std::move(in_sizes)) {}

  // Pulls whatever used entries are there into frames.
  void poll() {
    for (auto& u : g_.reclaim(q_)) {
      Bytes b = g_.rx_bytes(q_, u, in_);
      if (remaining_ > 0) {
        cur_.data.insert(cur_.data.end(), b.begin(), b.end());
        if (--remaining_ == 0) frames.push_back(std::move(cur_));
        continue;
      }
      if (u.len == 0) {
        ++empty_used;
        continue;
      }
      const std::size_t h = g_.hdr_len();
      RxFrame f;
      f.hdr.assign(b.begin(), b.begin() + std::min(h, b.size()));
      if (b.size() > h) f.data.assign(b.begin() + h, b.end());
      f.num_buffers = 1;
      if (h == 12 && b.size() >= 12) std::memcpy(&f.num_buffers, b.data() + 10, 2);
      if (f.num_buffers > 1) {
        remaining_ = f.num_buffers - 1;
        cur_ = std::move(f);
      } else {
        frames.push_back(std::move(f));
      }
    }
  }
  // Keeps the rx ring full of buffers.
  void refill() {
    while (g_.free_slots(q_) > 0) {
      bool ok = in_.size() == 1 ? g_.post_rx(q_, in_[0]) : g_.add_raw(q_, {}, in_).has_value();
      if (!ok) break;
    }
    g_.kick(q_);
  }
  bool wait_frames(std::size_t n, int timeout_ms = 20000) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      poll();
      if (frames.size() >= n) return true;
      if (std::chrono::steady_clock::now() >= deadline) return false;
      g_.wait_call(q_, 2);
    }
  }

  std::vector<RxFrame> frames;
  std::size_t empty_used = 0;

 private:
  Guest& g_;
  std::uint16_t q_;
  std::vector<std::uint32_t> in_;
  RxFrame cur_;
  std::size_t remaining_ = 0;
};

inline vhost::DeviceOptions dev_opts(vhost::PollMode mode) {
  vhost::DeviceOptions o;
  o.name = "net-test";
  o.mode = mode;
  o.adaptive_spin_us = 200;
  return o;
}

// A NetDevice with a guest brought up on it: on a FakePort (frames the device sends are seen,
// frames from the host injected) or, with no port, on the loopback (the guest's frames come back
// with the MACs swapped).
struct DeviceRig {
  DeviceRig(bool with_port, bool vnet, std::uint64_t features,
            vhost::PollMode mode = vhost::PollMode::event)
      : port(with_port ? new FakePort(vnet) : nullptr),
        net(make(port)),
        dev(net, dev_opts(mode)),
        g(3, features) {
    g.bring_up(dev);
  }
  static NetOptions make(FakePort* p) {
    NetOptions o;
    o.port.reset(p);  // null: loopback
    return o;
  }
  FakePort* port;  // owned by net; null on the loopback
  NetDevice net;
  vhost::Device dev;
  Guest g;
};

// Waits until all tx chains in flight on queue q came back.
inline bool wait_tx_done(Guest& g, std::uint16_t q, std::size_t ring_size = 256,
                         int timeout_ms = 20000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    g.reclaim(q);
    if (g.free_slots(q) == ring_size) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    g.wait_call(q, 2);
  }
}

// The device serves a receiveq whose buffers wait for frames: after a kick that brought no
// frame, vhost::Device re-enables notifications and re-polls while enable_notifications()
// returns true. That must mean "chains arrived since the last look" (Linux's
// vhost_enable_notify), not "chains not yet consumed", or the worker spins forever on an rx
// ring full of buffers. Checked once on a private ring.
inline bool enable_notifications_reports_only_new_chains() {
  alignas(4096) static std::uint8_t mem_block[1 << 16];
  memory::GuestMemory mem;
  if (!mem.add_local_region(memory::RegionSpec{0, sizeof mem_block, 0x10000000, 0}, mem_block)) {
    return false;
  }
  virtq::DriverQueue drv;
  auto layout = virtq::DriverRingLayout::for_size(8);
  if (!drv.init(std::span<std::byte>(reinterpret_cast<std::byte*>(mem_block), layout.total_bytes),
                0, 8, kEventIdx)) {
    return false;
  }
  virtq::DeviceQueue dq;
  dq.attach(&mem, virtq::SplitRing{drv.desc(), drv.avail(), drv.used(), 8}, kEventIdx, 0);
  const virtq::DriverQueue::Buffer in{0x8000, 64};
  if (!drv.add({}, {&in, 1}, 1)) return false;
  drv.publish();
  (void)dq.pending();                 // the device has seen the chain and leaves it there
  return !dq.enable_notifications();  // nothing new since
}

}  // namespace vhostkit::net::testing

// The guest half of the in-process device tests (vhost, net, blk): memfd memory mapped into the
// test process, one driver ring per ring (split or packed, as the features say), and the vhost-user
// bring-up of a vhost::Device over them, with real kick/call eventfds. The frontend and backend
// live in one process, so the guest's "uva" is simply its own mapping address; gpa starts at 0 and
// is one region.
//
// Each rig (vhost Rig, net Guest, blk BlkGuest) derives from GuestRings and adds only what its
// device needs on top: how buffers are laid out in memory and how answers are read back.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <expected>
#include <functional>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost::testing {

inline UniqueFd make_eventfd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

inline UniqueFd dup_fd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

// Waits up to timeout_ms for fd to become readable; reads (drains) it. True if it fired.
inline bool wait_fd(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return false;
  std::uint64_t v;
  return ::read(fd, &v, sizeof v) == sizeof v;
}

// Our driver on one ring in either layout, with the methods both share. A test that reaches
// into one layout's memory asks for it by name (split(), packed_queue()).
class DriverRing {
 public:
  using Buffer = virtq::DriverQueue::Buffer;
  using Used = virtq::DriverQueue::Used;

  bool packed() const { return packed_; }
  virtq::DriverQueue& split() { return split_; }
  virtq::PackedDriverQueue& packed_queue() { return packed_q_; }

  // (Re)initializes the ring at gpa (zeroed) in the layout the features say.
  Result<> init(std::uint8_t* host, std::uint64_t gpa, std::uint16_t size, std::uint64_t features) {
    packed_ = virtio::has(features, virtio::feature::ring_packed);
    if (packed_) {
      const auto bytes = virtq::PackedRingLayout::for_size(size).total_bytes;
      return packed_q_.init(std::span<std::byte>(reinterpret_cast<std::byte*>(host), bytes), gpa,
                            size, features);
    }
    const auto bytes = virtq::DriverRingLayout::for_size(size).total_bytes;
    return split_.init(std::span<std::byte>(reinterpret_cast<std::byte*>(host), bytes), gpa, size,
                       features);
  }

  std::expected<std::uint16_t, Errc> add(std::span<const Buffer> out, std::span<const Buffer> in,
                                         std::uint64_t token) {
    return packed_ ? packed_q_.add(out, in, token) : split_.add(out, in, token);
  }
  void publish() { packed_ ? packed_q_.publish() : split_.publish(); }
  bool needs_kick() { return packed_ ? packed_q_.needs_kick() : split_.needs_kick(); }
  std::optional<Used> get_used() { return packed_ ? packed_q_.get_used() : split_.get_used(); }
  std::uint16_t size() const { return packed_ ? packed_q_.size() : split_.size(); }
  std::uint16_t free_count() const {
    return packed_ ? packed_q_.free_count() : split_.free_count();
  }
  std::uint64_t bad_used() const { return packed_ ? packed_q_.bad_used() : split_.bad_used(); }
  void disable_interrupts() {
    packed_ ? packed_q_.disable_interrupts() : split_.disable_interrupts();
  }
  bool enable_interrupts() {
    return packed_ ? packed_q_.enable_interrupts() : split_.enable_interrupts();
  }

  // SET_VRING_ADDR's three guest addresses: split, desc/avail/used; packed, the descriptor
  // ring and the driver and device event areas.
  std::uint64_t desc_gpa() const { return packed_ ? packed_q_.desc_gpa() : split_.desc_gpa(); }
  std::uint64_t avail_gpa() const {
    return packed_ ? packed_q_.driver_event_gpa() : split_.avail_gpa();
  }
  std::uint64_t used_gpa() const {
    return packed_ ? packed_q_.device_event_gpa() : split_.used_gpa();
  }

 private:
  bool packed_ = false;
  virtq::DriverQueue split_;
  virtq::PackedDriverQueue packed_q_;
};

class GuestRings {
 public:
  // One 256 KiB slot of guest memory per ring, from gpa 0: room for a ring of 4096 entries.
  static constexpr std::uint64_t kRingStride = 0x40000;

  // Maps a rig's ring number to the device's queue index. Rigs may name rings by role rather
  // than by the spec's numbering (net does); the default is the identity.
  using DeviceIndex = std::function<std::uint16_t(std::uint16_t)>;

  GuestRings(const char* memfd_name, std::size_t mem_size, std::uint16_t queues,
             std::uint16_t ring_size, std::uint64_t features, DeviceIndex device_index = {})
      : features_(features),
        size_(ring_size),
        queues_(queues),
        mem_size_(mem_size),
        device_index_(std::move(device_index)) {
    memfd_ = UniqueFd(::memfd_create(memfd_name, MFD_CLOEXEC));
    EXPECT_TRUE(memfd_.valid());
    EXPECT_EQ(::ftruncate(memfd_.get(), static_cast<off_t>(mem_size_)), 0);
    void* p = ::mmap(nullptr, mem_size_, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    base_ = static_cast<std::uint8_t*>(p);
    drivers_.resize(queues);
    kicks_.resize(queues);
    calls_.resize(queues);
  }
  ~GuestRings() { ::munmap(base_, mem_size_); }
  // The mapping and the drivers' ring pointers belong to this object alone.
  GuestRings(const GuestRings&) = delete;
  GuestRings& operator=(const GuestRings&) = delete;

  std::uint64_t features() const { return features_; }
  std::uint16_t ring_size() const { return size_; }
  std::uint16_t queues() const { return queues_; }
  std::size_t mem_size() const { return mem_size_; }

  std::uint8_t* host(std::uint64_t gpa) { return base_ + gpa; }
  std::uint64_t uva(std::uint64_t gpa) const {
    return reinterpret_cast<std::uint64_t>(base_) + gpa;
  }
  int memfd() const { return memfd_.get(); }

  // The memory table as SET_MEM_TABLE takes it: the one region, with its own fd.
  memory::RegionSpec spec() const { return memory::RegionSpec{0, mem_size_, uva(0), 0}; }
  memory::RegionFd region() const { return memory::RegionFd{spec(), dup_fd(memfd_.get())}; }
  std::vector<memory::RegionFd> table() const {
    std::vector<memory::RegionFd> t;
    t.push_back(region());
    return t;
  }

  std::uint16_t device_index(std::uint16_t q) const { return device_index_ ? device_index_(q) : q; }
  DriverRing& driver(std::uint16_t q) { return drivers_[q]; }
  bool packed() const { return virtio::has(features_, virtio::feature::ring_packed); }
  int kick_fd(std::uint16_t q) const { return kicks_[q].get(); }
  int call_fd(std::uint16_t q) const { return calls_[q].get(); }
  void set_kick(std::uint16_t q, UniqueFd fd) { kicks_[q] = std::move(fd); }

  // (Re)initializes ring q's driver side (zeroed) at q * kRingStride.
  void init_driver(std::uint16_t q) { init_driver(q, features_); }
  void init_driver(std::uint16_t q, std::uint64_t features) {
    const std::uint64_t gpa = q * kRingStride;
    auto r = drivers_[q].init(host(gpa), gpa, size_, features);
    ASSERT_TRUE(r.has_value()) << r.error().message();
  }

  memory::VringAddr addr(std::uint16_t q) const {
    memory::VringAddr a;
    a.desc_user_addr = uva(drivers_[q].desc_gpa());
    a.avail_user_addr = uva(drivers_[q].avail_gpa());
    a.used_user_addr = uva(drivers_[q].used_gpa());
    return a;
  }

  // The vhost-user start sequence: owner, features, the memory table (prepare), then every ring.
  void bring_up(Device& dev, bool use_kick = true) {
    prepare(dev);
    if (::testing::Test::HasFatalFailure()) return;
    for (std::uint16_t q = 0; q < queues_; ++q) configure(dev, q, use_kick);
  }
  void prepare(Device& dev) {
    ASSERT_TRUE(dev.set_owner().has_value());
    auto f = dev.set_features(features_);
    ASSERT_TRUE(f.has_value()) << f.error().message();
    auto m = dev.set_mem_table(table());
    ASSERT_TRUE(m.has_value()) << m.error().message();
  }

  // The start sequence for ring q (device queue device_index(q)). use_kick=false: no kick fd,
  // so the device must poll.
  // resume_base (split): the ring is handed over as it stands (not zeroed), resuming there, as
  // a front-end does to a restarted back-end.
  void configure(Device& dev, std::uint16_t q, bool use_kick = true,
                 std::optional<std::uint16_t> resume_base = std::nullopt) {
    const std::uint16_t dq = device_index(q);
    if (!resume_base) init_driver(q);
    if (::testing::Test::HasFatalFailure()) return;  // no ring to give the device
    ASSERT_TRUE(dev.set_vring_num(dq, size_).has_value());
    // A new ring: split, avail index 0; packed, both positions 0 with their wrap counters set.
    const std::uint32_t base = resume_base ? *resume_base
                               : packed()  ? virtq::PackedRingBase{}.encode()
                                           : 0;
    ASSERT_TRUE(dev.set_vring_base(dq, base).has_value());
    auto a = dev.set_vring_addr(dq, addr(q));
    ASSERT_TRUE(a.has_value()) << a.error().message();
    calls_[q] = make_eventfd();
    ASSERT_TRUE(dev.set_vring_call(dq, dup_fd(calls_[q].get())).has_value());
    if (use_kick) {
      kicks_[q] = make_eventfd();
      ASSERT_TRUE(dev.set_vring_kick(dq, dup_fd(kicks_[q].get())).has_value());
    } else {
      kicks_[q].reset();
      ASSERT_TRUE(dev.set_vring_kick(dq, UniqueFd()).has_value());
    }
    auto e = dev.set_vring_enable(dq, true);
    ASSERT_TRUE(e.has_value()) << e.error().message();
  }

  // Publishes ring q's new avail entries and kicks when the device asked for it (and a kick fd
  // is set). False only if writing the kick failed.
  bool kick(std::uint16_t q) {
    drivers_[q].publish();
    if (drivers_[q].needs_kick() && kicks_[q]) {
      const std::uint64_t one = 1;
      return ::write(kicks_[q].get(), &one, sizeof one) == sizeof one;
    }
    return true;
  }

  // Waits up to ms for ring q's call eventfd (draining it). True if it fired.
  bool wait_call(std::uint16_t q, int ms) { return wait_fd(calls_[q].get(), ms); }

 private:
  std::uint64_t features_;
  std::uint16_t size_;
  std::uint16_t queues_;
  std::size_t mem_size_;
  DeviceIndex device_index_;
  UniqueFd memfd_;
  std::uint8_t* base_ = nullptr;
  std::vector<DriverRing> drivers_;
  std::vector<UniqueFd> kicks_;
  std::vector<UniqueFd> calls_;
};

}  // namespace vhostkit::vhost::testing

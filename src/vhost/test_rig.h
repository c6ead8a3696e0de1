// Test rig for the vhost tests: an "echo" DeviceBackend, and a driver (virtq::DriverQueue) over
// memfd memory that the Device maps through set_mem_table, exactly like a vhost-user frontend
// and backend in one process. The driver's "uva" is its own mapping address; gpa starts at 0.
#pragma once

#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <dirent.h>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost::testing {

inline constexpr std::uint64_t kEchoFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx);

// For each chain: copy the readable bytes into the writable part, used len = bytes copied.
class EchoBackend : public DeviceBackend {
 public:
  explicit EchoBackend(std::uint16_t queues = 2) : queues_(queues) {}
  std::uint64_t features() const noexcept override { return kEchoFeatures; }
  std::uint16_t num_queues() const noexcept override { return queues_; }
  void queue_started(Queue&, Worker&) override { started_calls++; }
  void queue_stopped(Queue&, Worker&) override { stopped_calls++; }
  void quiesce(Queue&, Worker&) override { quiesce_calls++; }

  bool handle_queue(Queue& q) noexcept override {
    auto& vq = q.vq();
    int n = 0;
    while (n < 32 && vq.pending() > 0) {
      ++n;
      auto c = vq.pop(segs_);
      if (!c) continue;  // answered with len 0 by the DeviceQueue, counted there
      std::uint32_t copied = 0;
      std::size_t wi = 0, woff = 0;
      for (const iovec& r : c->readable) {
        std::size_t roff = 0;
        while (roff < r.iov_len && wi < c->writable.size()) {
          const iovec& w = c->writable[wi];
          const std::size_t k = std::min(r.iov_len - roff, w.iov_len - woff);
          std::memcpy(static_cast<char*>(w.iov_base) + woff, static_cast<char*>(r.iov_base) + roff, k);
          roff += k;
          woff += k;
          copied += static_cast<std::uint32_t>(k);
          if (woff == w.iov_len) {
            ++wi;
            woff = 0;
          }
        }
      }
      vq.push_used(c->head, copied);
      q.stats().add(q.stats().chains);
      q.stats().add(q.stats().bytes, copied);
    }
    if (n > 0) q.publish_and_notify();
    return n > 0;
  }

  std::atomic<int> started_calls{0};
  std::atomic<int> quiesce_calls{0};
  std::atomic<int> stopped_calls{0};

 private:
  std::uint16_t queues_;
  std::array<iovec, 64> segs_{};
};

inline UniqueFd make_eventfd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

inline UniqueFd dup_fd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

// Waits up to timeout_ms for fd to become readable; reads (drains) it. True if it fired.
inline bool wait_fd(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return false;
  std::uint64_t v;
  return ::read(fd, &v, sizeof v) == sizeof v;
}

inline std::size_t count_fds() {
  std::size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;  // the DIR's own fd
}

// Shared memory (memfd) with a driver ring per queue and a data area.
class Rig {
 public:
  static constexpr std::size_t kMemSize = 4u << 20;
  static constexpr std::uint64_t kRingStride = 0x40000;  // one 256 KiB slot per queue
  static constexpr std::uint64_t kDataGpa = 0x200000;

  explicit Rig(std::uint16_t queues = 2, std::uint16_t size = 256) : size_(size) {
    memfd_ = UniqueFd(::memfd_create("vhost-test", MFD_CLOEXEC));
    EXPECT_TRUE(memfd_.valid());
    EXPECT_EQ(::ftruncate(memfd_.get(), kMemSize), 0);
    void* p = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    base_ = static_cast<std::uint8_t*>(p);
    drivers_.resize(queues);
    kicks_.resize(queues);
    calls_.resize(queues);
  }
  ~Rig() { ::munmap(base_, kMemSize); }

  memory::RegionSpec spec() const {
    return memory::RegionSpec{0, kMemSize, uva(0), 0};
  }
  MemRegionFd region() const { return MemRegionFd{spec(), dup_fd(memfd_.get())}; }
  std::vector<MemRegionFd> table() const {
    std::vector<MemRegionFd> t;
    t.push_back(region());
    return t;
  }
  std::uint64_t uva(std::uint64_t gpa) const { return reinterpret_cast<std::uint64_t>(base_) + gpa; }
  std::uint8_t* host(std::uint64_t gpa) { return base_ + gpa; }
  int memfd() const { return memfd_.get(); }

  virtq::DriverQueue& driver(std::uint16_t q) { return drivers_[q]; }
  int kick_fd(std::uint16_t q) const { return kicks_[q].get(); }
  int call_fd(std::uint16_t q) const { return calls_[q].get(); }

  // (Re)initializes queue q's driver ring (zeroed).
  void init_driver(std::uint16_t q, std::uint64_t features = kEchoFeatures) {
    const std::uint64_t gpa = q * kRingStride;
    auto layout = virtq::DriverRingLayout::for_size(size_);
    auto r = drivers_[q].init(
        std::span<std::byte>(reinterpret_cast<std::byte*>(host(gpa)), layout.total_bytes), gpa,
        size_, features);
    ASSERT_TRUE(r.has_value()) << r.error().message();
  }

  VringAddr addr(std::uint16_t q) {
    VringAddr a;
    a.desc_user_addr = uva(drivers_[q].desc_gpa());
    a.avail_user_addr = uva(drivers_[q].avail_gpa());
    a.used_user_addr = uva(drivers_[q].used_gpa());
    return a;
  }

  // The full vhost-user start sequence for queue q. use_kick=false: no kick fd (polling).
  void configure(Device& dev, std::uint16_t q, bool use_kick = true) {
    init_driver(q);
    ASSERT_TRUE(dev.set_vring_num(q, size_).has_value());
    ASSERT_TRUE(dev.set_vring_base(q, 0).has_value());
    auto a = dev.set_vring_addr(q, addr(q));
    ASSERT_TRUE(a.has_value()) << a.error().message();
    calls_[q] = make_eventfd();
    ASSERT_TRUE(dev.set_vring_call(q, dup_fd(calls_[q].get())).has_value());
    if (use_kick) {
      kicks_[q] = make_eventfd();
      ASSERT_TRUE(dev.set_vring_kick(q, dup_fd(kicks_[q].get())).has_value());
    } else {
      kicks_[q].reset();
      ASSERT_TRUE(dev.set_vring_kick(q, UniqueFd()).has_value());
    }
    auto e = dev.set_vring_enable(q, true);
    ASSERT_TRUE(e.has_value()) << e.error().message();
  }

  void set_kick(std::uint16_t q, UniqueFd fd) { kicks_[q] = std::move(fd); }

  // Posts one request (out: payload, in: a buffer of the same size) and kicks if asked to.
  void post(std::uint16_t q, std::string_view payload, std::uint64_t token) {
    const std::uint64_t out_gpa = kDataGpa + q * 0x80000 + (token % 256) * 0x800;
    const std::uint64_t in_gpa = out_gpa + 0x400;
    std::memcpy(host(out_gpa), payload.data(), payload.size());
    std::memset(host(in_gpa), 0, payload.size());
    virtq::DriverQueue::Buffer out{out_gpa, static_cast<std::uint32_t>(payload.size())};
    virtq::DriverQueue::Buffer in{in_gpa, static_cast<std::uint32_t>(payload.size())};
    auto h = drivers_[q].add({&out, 1}, {&in, 1}, token);
    ASSERT_TRUE(h.has_value());
    drivers_[q].publish();
    if (drivers_[q].needs_kick() && kicks_[q]) {
      const std::uint64_t one = 1;
      ASSERT_EQ(::write(kicks_[q].get(), &one, sizeof one), 8);
    }
  }

  std::string reply(std::uint16_t q, std::uint64_t token, std::size_t len) {
    const std::uint64_t in_gpa = kDataGpa + q * 0x80000 + (token % 256) * 0x800 + 0x400;
    return std::string(reinterpret_cast<char*>(host(in_gpa)), len);
  }

  // Collects a used element, waiting on the call eventfd with poll() (or spinning when
  // no call is expected) up to timeout_ms.
  std::optional<virtq::DriverQueue::Used> wait_used(std::uint16_t q, int timeout_ms = 1000,
                                                    bool poll_call = true) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      if (auto u = drivers_[q].get_used()) return u;
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      if (poll_call) {
        wait_fd(calls_[q].get(), 5);
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  std::uint16_t size_;
  UniqueFd memfd_;
  std::uint8_t* base_ = nullptr;
  std::vector<virtq::DriverQueue> drivers_;
  std::vector<UniqueFd> kicks_;
  std::vector<UniqueFd> calls_;
};

}  // namespace vhostkit::vhost::testing

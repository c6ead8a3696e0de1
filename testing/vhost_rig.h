// Test rig for the vhost tests: an "echo" DeviceBackend, and a driver (virtq::DriverQueue) over
// memfd memory that the Device maps through set_mem_table, exactly like a vhost-user frontend
// and backend in one process (the guest half is GuestRings, shared with the net and blk rigs).
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "testing/guest_rig.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/iov.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost::testing {

inline constexpr std::uint64_t kEchoFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx);
// What the echo device offers on top for the packed-ring tests.
inline constexpr std::uint64_t kEchoPacked =
    virtio::bit(virtio::feature::ring_packed) | virtio::bit(virtio::feature::in_order);

// For each chain: copy the readable bytes into the writable part, used len = bytes copied.
class EchoBackend : public DeviceBackend {
 public:
  explicit EchoBackend(std::uint16_t queues = 2, std::uint64_t extra_features = 0)
      : queues_(queues), features_(kEchoFeatures | extra_features) {}
  std::uint64_t features() const noexcept override { return features_; }
  std::uint16_t num_queues() const noexcept override { return queues_; }
  void queue_started(Queue&, Worker&) override { started_calls++; }
  void queue_stopped(Queue&, Worker&) override { stopped_calls++; }
  void quiesce(Queue&, Worker&) override { quiesce_calls++; }

  bool handle_queue(Queue& q) noexcept override {
    return q.packed() ? echo(q, q.packed_vq()) : echo(q, q.vq());
  }

  std::atomic<int> started_calls{0};
  std::atomic<int> quiesce_calls{0};
  std::atomic<int> stopped_calls{0};

 private:
  template <virtq::DeviceRing R>
  bool echo(Queue& q, R& vq) noexcept {
    int n = 0;
    while (n < 32 && vq.pending() > 0) {
      ++n;
      auto c = vq.pop(segs_);
      if (!c) continue;  // answered with len 0 by the DeviceQueue, counted there
      const auto copied = static_cast<std::uint32_t>(
          virtq::iov_copy(c->writable, 0, c->readable, 0, c->readable_len));
      vq.log_write(c->writable, copied);
      vq.push_used(c->head, copied);
      q.stats().add(q.stats().chains);
      q.stats().add(q.stats().bytes, copied);
    }
    if (n > 0) q.publish_and_notify();
    return n > 0;
  }

  std::uint16_t queues_;
  std::uint64_t features_;
  std::array<iovec, 64> segs_{};
};

// Shared memory (memfd) with a driver ring per queue and a data area; post() lays a request and
// its reply buffer out in the data area, one 2 KiB slot per token.
class Rig : public GuestRings {
 public:
  static constexpr std::size_t kMemSize = 4u << 20;
  static constexpr std::uint64_t kDataGpa = 0x200000;

  explicit Rig(std::uint16_t queues = 2, std::uint16_t size = 256,
               std::uint64_t features = kEchoFeatures)
      : GuestRings("vhost-test", kMemSize, queues, size, features) {}

  // Posts one request (out: payload, in: a buffer of the same size) and kicks if asked to.
  void post(std::uint16_t q, std::string_view payload, std::uint64_t token) {
    const std::uint64_t out_gpa = kDataGpa + q * 0x80000 + (token % 256) * 0x800;
    const std::uint64_t in_gpa = out_gpa + 0x400;
    std::memcpy(host(out_gpa), payload.data(), payload.size());
    std::memset(host(in_gpa), 0, payload.size());
    DriverRing::Buffer out{out_gpa, static_cast<std::uint32_t>(payload.size())};
    DriverRing::Buffer in{in_gpa, static_cast<std::uint32_t>(payload.size())};
    auto h = driver(q).add({&out, 1}, {&in, 1}, token);
    ASSERT_TRUE(h.has_value());
    ASSERT_TRUE(kick(q));
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
      if (auto u = driver(q).get_used()) return u;
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      if (poll_call) {
        wait_call(q, 5);
      } else {
        std::this_thread::yield();
      }
    }
  }
};

}  // namespace vhostkit::vhost::testing

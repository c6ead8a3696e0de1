// Test helpers for the back-end session: an echo device, and a small front-end that speaks
// vhost-user through a Channel, shares one memfd as guest memory and drives the rings with
// virtq::DriverQueue.
#pragma once

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "testing/fd_count.h"
#include "vhostkit/vhost/backend.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/iov.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost_user::test {

// Copies each chain's readable bytes into its writable part. Config space: 16 bytes, the first
// 8 read-only.
class EchoBackend : public vhost::DeviceBackend {
 public:
  static constexpr std::uint16_t kQueues = 2;
  static constexpr std::size_t kConfigSize = 16;

  EchoBackend() {
    for (std::size_t i = 0; i < kConfigSize; ++i) config_[i] = static_cast<std::uint8_t>(0xa0 + i);
  }
  std::uint64_t features() const noexcept override {
    return virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx);
  }
  std::uint16_t num_queues() const noexcept override { return kQueues; }

  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override {
    if (offset > kConfigSize || out.size() > kConfigSize - offset) {
      return fail(Errc::out_of_range, "config read past the end");
    }
    std::memcpy(out.data(), config_.data() + offset, out.size());
    return {};
  }
  Result<> write_config(std::uint32_t offset, std::span<const std::uint8_t> data) override {
    if (offset < 8 || offset > kConfigSize || data.size() > kConfigSize - offset) {
      return fail(Errc::invalid_argument, "config write outside the writable bytes 8..15");
    }
    std::memcpy(config_.data() + offset, data.data(), data.size());
    return {};
  }

  bool handle_queue(vhost::Queue& q) noexcept override {
    auto& vq = q.vq();
    bool did = false;
    std::array<iovec, 16> segs;
    for (int n = 0; n < 32 && vq.pending() > 0; ++n) {
      auto c = vq.pop(segs);
      did = true;
      if (!c) {
        if (virtq::breaks_queue(c.error())) break;
        continue;
      }
      const std::size_t copied = virtq::iov_copy(c->writable, 0, c->readable, 0, c->readable_len);
      vq.push_used(c->head, static_cast<std::uint32_t>(copied));
    }
    if (did) q.publish_and_notify();
    return did;
  }

 private:
  std::array<std::uint8_t, kConfigSize> config_{};
};

inline UniqueFd make_eventfd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

struct FrontendOptions {
  bool protocol_features = true;  // ack VHOST_USER_F_PROTOCOL_FEATURES
  bool reply_ack = true;          // negotiate REPLY_ACK and set NEED_REPLY on every request
  std::uint16_t ring_size = 64;
  std::uint16_t rings = EchoBackend::kQueues;
  bool enable_rings = true;  // send SET_VRING_ENABLE 1 (only with protocol features)
  // Hand a ring set up before (on an earlier connection) to the back-end again as it stands,
  // resuming at `base`, as a front-end does after its back-end restarted.
  bool resume = false;
  std::uint16_t base = 0;
};

// A front-end over a Channel. `pump` runs after every request is sent: tests that drive the
// session synchronously pass [&] { session.serve_one(); }; threaded tests leave it empty.
class TestFrontend {
 public:
  static constexpr std::size_t kMemSize = 1 << 20;
  static constexpr std::uint64_t kGpaBase = 0x100000;
  static constexpr std::size_t kRingStride = 64 << 10;   // ring i at i * 64 KiB
  static constexpr std::size_t kDataOffset = 512 << 10;  // buffers from 512 KiB on
  static constexpr std::size_t kBufSize = 2048;

  explicit TestFrontend(Channel ch, std::function<void()> pump = {})
      : ch_(std::move(ch)), pump_(std::move(pump)) {
    (void)ch_.set_timeout(std::chrono::milliseconds(5000));
    memfd_ = UniqueFd(::memfd_create("vk-test-guest", MFD_CLOEXEC));
    if (memfd_ && ::ftruncate(memfd_.get(), kMemSize) == 0) {
      void* p = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_.get(), 0);
      if (p != MAP_FAILED) mem_ = static_cast<std::uint8_t*>(p);
    }
  }
  ~TestFrontend() {
    if (mem_ != nullptr) ::munmap(mem_, kMemSize);
  }
  TestFrontend(const TestFrontend&) = delete;
  TestFrontend& operator=(const TestFrontend&) = delete;

  Channel& channel() { return ch_; }
  void disconnect() { ch_.release().reset(); }
  std::uint8_t* mem() { return mem_; }
  int memfd() const { return memfd_.get(); }
  std::uint64_t uva_base() const { return reinterpret_cast<std::uint64_t>(mem_); }
  std::uint64_t features() const { return features_; }
  bool need_reply() const { return need_reply_; }
  void set_need_reply(bool v) { need_reply_ = v; }

  // The one-region table describing all of our memory.
  memory::RegionSpec region() const {
    return {.guest_phys_addr = kGpaBase,
            .size = kMemSize,
            .userspace_addr = uva_base(),
            .mmap_offset = 0};
  }

  // Sends a request (NEED_REPLY if `need_reply`), pumps the session, and returns the ack when
  // one was asked for (0 when not).
  template <Encodable T>
  Result<std::uint64_t> request(const T& m, bool need_reply) {
    if (auto r = ch_.send_message(m, need_reply ? kNeedReplyFlag : 0); !r) {
      return std::unexpected(r.error());
    }
    pump();
    if (!need_reply) return 0;
    auto rep = ch_.recv();
    if (!rep) return std::unexpected(rep.error());
    return decode_u64_reply(*rep, T::kRequest);
  }
  template <Encodable T>
  Result<std::uint64_t> request(const T& m) {
    return request(m, need_reply_);
  }
  // Like request(), but a non-zero ack is an error.
  template <Encodable T>
  Result<> ok(const T& m) {
    auto r = request(m);
    if (!r) return std::unexpected(r.error());
    if (*r != 0)
      return fail(Errc::invalid_argument, fmt::format("{} acked {}", to_string(T::kRequest), *r));
    return {};
  }
  // A request whose reply is a u64 (GET_FEATURES, ...).
  template <Encodable T>
  Result<std::uint64_t> get(const T& m) {
    if (auto r = ch_.send_message(m); !r) return std::unexpected(r.error());
    pump();
    auto rep = ch_.recv();
    if (!rep) return std::unexpected(rep.error());
    return decode_u64_reply(*rep, T::kRequest);
  }
  Result<VringState> get_vring_base(std::uint32_t index) {
    if (auto r = ch_.send_message(GetVringBase{index, 0}); !r) return std::unexpected(r.error());
    pump();
    auto rep = ch_.recv();
    if (!rep) return std::unexpected(rep.error());
    return decode_vring_state_reply(*rep, Request::get_vring_base);
  }
  Result<ConfigReply> get_config(std::uint32_t offset, std::uint32_t size) {
    if (auto r = ch_.send_message(GetConfig{offset, size, 0}); !r)
      return std::unexpected(r.error());
    pump();
    auto rep = ch_.recv();
    if (!rep) return std::unexpected(rep.error());
    return decode_config_reply(*rep);
  }

  // Feature and protocol negotiation, SET_OWNER.
  Result<> handshake(const FrontendOptions& o = {}) {
    if (mem_ == nullptr) return fail(Errc::system, "test guest memory not mapped");
    auto offered = get(GetFeatures{});
    if (!offered) return std::unexpected(offered.error());
    const std::uint64_t pf = virtio::bit(virtio::feature::protocol_features);
    need_reply_ = false;
    if (o.protocol_features && (*offered & pf)) {
      auto proto = get(GetProtocolFeatures{});
      if (!proto) return std::unexpected(proto.error());
      std::uint64_t want = *proto;
      if (!o.reply_ack) want &= ~protocol_bit(protocol_feature::reply_ack);
      if (auto r = request(SetProtocolFeatures{want}, false); !r) return std::unexpected(r.error());
      protocol_ = want;
      need_reply_ = (want & protocol_bit(protocol_feature::reply_ack)) != 0;
    }
    if (auto r = ok(SetOwner{}); !r) return r;
    features_ =
        *offered & (virtio::bit(virtio::feature::version_1) |
                    virtio::bit(virtio::feature::ring_event_idx) | (o.protocol_features ? pf : 0));
    return ok(SetFeatures{features_});
  }

  Result<> set_mem_table() {
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{region(), dup_memfd()});
    return ok(t);
  }

  UniqueFd dup_memfd() const { return UniqueFd(::fcntl(memfd_.get(), F_DUPFD_CLOEXEC, 0)); }

  // SET_VRING_NUM/BASE/ADDR/CALL/KICK for ring `i` (and ENABLE when asked and negotiated).
  Result<> setup_ring(std::uint32_t i, const FrontendOptions& o = {}) {
    if (rings_.size() <= i) rings_.resize(i + 1);
    Ring& r = rings_[i];
    const std::size_t off = i * kRingStride;
    const auto layout = virtq::DriverRingLayout::for_size(o.ring_size);
    if (layout.total_bytes > kRingStride) return fail(Errc::invalid_argument, "ring too big");
    if (!o.resume || !r.dq) {
      r.dq = std::make_unique<virtq::DriverQueue>();
      auto span =
          std::span<std::byte>(reinterpret_cast<std::byte*>(mem_ + off), layout.total_bytes);
      if (auto res = r.dq->init(span, kGpaBase + off, o.ring_size, features_); !res) return res;
    }
    r.kick = make_eventfd();
    r.call = make_eventfd();
    if (auto res = ok(SetVringNum{i, o.ring_size}); !res) return res;
    if (auto res = ok(SetVringBase{i, o.resume ? o.base : 0u}); !res) return res;
    SetVringAddr a;
    a.index = i;
    a.addr.desc_user_addr = uva_base() + off + layout.desc_offset;
    a.addr.avail_user_addr = uva_base() + off + layout.avail_offset;
    a.addr.used_user_addr = uva_base() + off + layout.used_offset;
    if (auto res = ok(a); !res) return res;
    SetVringCall c;
    c.index = static_cast<std::uint8_t>(i);
    c.fd = UniqueFd(::fcntl(r.call.get(), F_DUPFD_CLOEXEC, 0));
    if (auto res = ok(c); !res) return res;
    SetVringKick k;
    k.index = static_cast<std::uint8_t>(i);
    k.fd = UniqueFd(::fcntl(r.kick.get(), F_DUPFD_CLOEXEC, 0));
    if (auto res = ok(k); !res) return res;
    if (o.enable_rings && (features_ & virtio::bit(virtio::feature::protocol_features))) {
      if (auto res = ok(SetVringEnable{i, 1}); !res) return res;
    }
    return {};
  }

  // handshake + memory + every ring.
  Result<> negotiate(const FrontendOptions& o = {}) {
    if (auto r = handshake(o); !r) return r;
    if (auto r = set_mem_table(); !r) return r;
    for (std::uint32_t i = 0; i < o.rings; ++i) {
      if (auto r = setup_ring(i, o); !r) return r;
    }
    return {};
  }

  // Sends `len` bytes of a pattern through ring `i` and waits (up to `timeout`) for the echo.
  // Returns the number of bytes echoed, checked against what was sent.
  Result<std::uint32_t> echo(std::uint32_t i, std::uint32_t len, std::uint8_t seed = 1,
                             std::chrono::milliseconds timeout = std::chrono::milliseconds(3000)) {
    if (i >= rings_.size() || !rings_[i].dq) return fail(Errc::bad_state, "ring not set up");
    Ring& r = rings_[i];
    const std::size_t slot = (r.next_slot++ % 64) * 2;
    const std::size_t out_off = kDataOffset + (i * 128 + slot) * kBufSize;
    const std::size_t in_off = out_off + kBufSize;
    len = std::min<std::uint32_t>(len, kBufSize);
    for (std::uint32_t b = 0; b < len; ++b) mem_[out_off + b] = static_cast<std::uint8_t>(seed + b);
    std::memset(mem_ + in_off, 0, kBufSize);
    const virtq::DriverQueue::Buffer out{kGpaBase + out_off, len};
    const virtq::DriverQueue::Buffer in{kGpaBase + in_off, static_cast<std::uint32_t>(kBufSize)};
    auto head = r.dq->add({&out, 1}, {&in, 1}, out_off);
    if (!head) return fail(Errc::would_block, "ring full");
    r.dq->publish();
    const std::uint64_t one = 1;
    [[maybe_unused]] auto w = ::write(r.kick.get(), &one, sizeof one);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (auto u = r.dq->get_used()) {
        if (u->token != out_off) return fail(Errc::invalid_argument, "used the wrong chain");
        if (u->len != len) {
          return fail(Errc::invalid_argument, fmt::format("echoed {} bytes, sent {}", u->len, len));
        }
        if (std::memcmp(mem_ + out_off, mem_ + in_off, len) != 0) {
          return fail(Errc::invalid_argument, "echoed bytes differ");
        }
        return u->len;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return fail(Errc::would_block, "no echo before the timeout");
      pollfd p{r.call.get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(std::min<long>(left.count(), 50))) > 0) {
        std::uint64_t v;
        [[maybe_unused]] auto n = ::read(r.call.get(), &v, sizeof v);
      }
    }
  }

  virtq::DriverQueue& driver_queue(std::uint32_t i) { return *rings_[i].dq; }
  void kick(std::uint32_t i) {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto w = ::write(rings_[i].kick.get(), &one, sizeof one);
  }
  int call_fd(std::uint32_t i) const { return rings_[i].call.get(); }

  // GET_INFLIGHT_FD: the reply decoded (its fd owned by the caller).
  Result<InflightReply> get_inflight_fd(std::uint16_t num_queues, std::uint16_t queue_size) {
    GetInflightFd m{Inflight{.num_queues = num_queues, .queue_size = queue_size}};
    if (auto r = ch_.send_message(m); !r) return std::unexpected(r.error());
    pump();
    auto rep = ch_.recv();
    if (!rep) return std::unexpected(rep.error());
    return decode_inflight_reply(std::move(*rep));
  }

 private:
  void pump() {
    if (pump_) pump_();
  }

  struct Ring {
    std::unique_ptr<virtq::DriverQueue> dq;
    UniqueFd kick;
    UniqueFd call;
    std::size_t next_slot = 0;
  };

  Channel ch_;
  std::function<void()> pump_;
  UniqueFd memfd_;
  std::uint8_t* mem_ = nullptr;
  std::uint64_t features_ = 0;
  std::uint64_t protocol_ = 0;
  bool need_reply_ = false;
  std::vector<Ring> rings_;
};

// A device and a session on it running in a thread; the test is the front-end.
struct ThreadedSession {
  EchoBackend backend;
  vhost::Device device{backend, vhost::DeviceOptions{.name = "vk-test"}};
  UniqueFd stop = make_eventfd();

  // Runs one session on `ch` until it ends; returns when it did.
  std::thread start(Channel ch, SessionOptions opts = {}) {
    return std::thread([this, ch = std::move(ch), opts = std::move(opts)]() mutable {
      BackendSession s(device, std::move(ch), std::move(opts));
      result = s.run(stop.get());
    });
  }
  Result<> result;
};

// One connect / negotiate / traffic / disconnect cycle against `ts`.
inline void one_cycle(ThreadedSession& ts, int packets = 4) {
  auto pair = socketpair();
  ASSERT_TRUE(pair.has_value());
  std::thread t = ts.start(std::move(pair->first));
  {
    TestFrontend fe(std::move(pair->second));
    auto n = fe.negotiate();
    ASSERT_TRUE(n.has_value()) << n.error().message();
    for (int p = 0; p < packets; ++p) {
      auto e = fe.echo(static_cast<std::uint32_t>(p % 2), 64 + p);
      ASSERT_TRUE(e.has_value()) << e.error().message();
    }
    fe.disconnect();
  }
  t.join();
  ASSERT_TRUE(ts.result.has_value()) << ts.result.error().message();
}

// Runs `cycles` cycles and checks the fd count after the last equals that after the first.
inline void fd_stable_over_cycles(int cycles) {
  ThreadedSession ts;
  one_cycle(ts);
  if (::testing::Test::HasFatalFailure()) return;
  const std::size_t after_first = vhostkit::testing::open_fd_count();
  for (int c = 1; c < cycles; ++c) {
    one_cycle(ts, 2);
    if (::testing::Test::HasFatalFailure()) {
      ADD_FAILURE() << "cycle " << c;
      return;
    }
  }
  EXPECT_EQ(vhostkit::testing::open_fd_count(), after_first) << "after " << cycles << " cycles";
}

}  // namespace vhostkit::vhost_user::test

// Test support for the live-traffic tests: a real back-end (NetDevice in loopback, vhost::Device,
// BackendServer on a socket path), our front-end (NetDriver on FrontendSession), a driver thread
// per queue pair that keeps frames moving and checks every one that comes back, and a second
// control channel on the front-end's socket through which a test sends the control events a
// front-end like QEMU sends while the guest runs (SET_MEM_TABLE, GET_VRING_BASE, SET_VRING_ENABLE
// ...).
//
// Every frame carries its pair, a sequence number and a checksum, and has a length that follows
// from its sequence number, so a frame lost, duplicated, reordered, truncated or overwritten is
// seen by the driver that receives it.
#pragma once

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <dirent.h>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "testing/sockets.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/net/net_device.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/server.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::live {

using namespace std::chrono_literals;
using driver::NetDriver;

// Generous: the host is a loaded 2-core VM; these normally pass in milliseconds.
inline constexpr auto kDeadline = 30s;

// Polls `pred` until it holds or `timeout` passes; true if it held.
inline bool eventually(const std::function<bool()>& pred,
                       std::chrono::milliseconds timeout = kDeadline) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= end) return pred();
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

inline std::string temp_sock(const char* tag) {
  static std::atomic<int> n{0};
  return fmt::format("/tmp/vk-live-{}-{}-{}.sock", tag, ::getpid(), n.fetch_add(1));
}

// ---- frames ------------------------------------------------------------------------------

inline constexpr std::array<std::uint8_t, 6> kLoopMac{0x02, 0x00, 0x00, 0x00, 0x00, 0x01};
inline constexpr std::size_t kFrameHead = 24;  // Ethernet header, pair, seq, checksum

inline std::array<std::uint8_t, 6> pair_mac(std::uint16_t qp) {
  return {0x02, 0x00, 0x00, 0x00, 0x01, static_cast<std::uint8_t>(qp)};
}
// 64..1514 bytes, different for neighbouring sequence numbers.
inline std::size_t frame_len(std::uint32_t seq) { return 64 + (seq * 37u) % 1451u; }
inline std::uint8_t pattern(std::uint32_t seq, std::size_t i) {
  return static_cast<std::uint8_t>(seq * 131u + i * 7u + (i >> 8));
}
// FNV-1a over the pair and seq fields and the payload: everything but the MACs (which the
// loopback swaps) and the checksum itself.
inline std::uint32_t frame_sum(std::span<const std::uint8_t> f) {
  std::uint32_t h = 2166136261u;
  auto mix = [&](std::uint8_t b) { h = (h ^ b) * 16777619u; };
  for (std::size_t i = 12; i < 20; ++i) mix(f[i]);
  for (std::size_t i = kFrameHead; i < f.size(); ++i) mix(f[i]);
  return h;
}
// Writes frame `seq` of pair qp into `out`; returns its length.
inline std::size_t write_frame(std::uint16_t qp, std::uint32_t seq, std::span<std::uint8_t> out) {
  const std::size_t len = frame_len(seq);
  if (len > out.size()) return 0;
  std::memcpy(out.data(), kLoopMac.data(), 6);  // dst
  const auto src = pair_mac(qp);
  std::memcpy(out.data() + 6, src.data(), 6);  // src
  out[12] = 0x88;                              // local experimental ethertype
  out[13] = 0xb5;
  std::memcpy(out.data() + 14, &qp, 2);
  std::memcpy(out.data() + 16, &seq, 4);
  for (std::size_t i = kFrameHead; i < len; ++i) out[i] = pattern(seq, i);
  const std::uint32_t sum = frame_sum(out.first(len));
  std::memcpy(out.data() + 20, &sum, 4);
  return len;
}

// ---- a driver per queue pair -------------------------------------------------------------

// Moves frames through pair qp of `s` on its own thread until stop(): sends while fewer than
// kWindow frames are in flight (so the loopback always finds an rx buffer: the window is below
// the ring size), receives and checks every frame. `exact`: every frame must come back, in
// order (no drops allowed); otherwise frames the device counted as dropped may be missing, but
// the ones that arrive must still be intact and strictly increasing.
class PairDriver {
 public:
  static constexpr std::uint32_t kWindow = 96;
  static constexpr std::size_t kBurst = 32;

  // Sees each frame that passed the checks, with its sequence number, on the driver thread
  // (the span is the frame as rx_burst hands it over: in the receive buffer when it fit one).
  using Observer = std::function<void(std::uint32_t seq, std::span<const std::uint8_t> frame)>;

  PairDriver(NetDriver& s, net::NetDevice& dev, std::uint16_t qp, bool exact, Observer obs = {})
      : PairDriver(s, std::vector<net::NetDevice*>{&dev}, qp, exact, std::move(obs)) {}
  // Frames may be dropped by any of `devs` (the back-ends a migration moves the rings between).
  PairDriver(NetDriver& s, std::vector<net::NetDevice*> devs, std::uint16_t qp, bool exact,
             Observer obs = {})
      : s_(s),
        devs_(std::move(devs)),
        qp_(qp),
        exact_(exact),
        observer_(std::move(obs)),
        drops_at_start_(total_drops()) {
    thread_ = std::thread([this] { run(); });
  }
  ~PairDriver() { join(); }
  PairDriver(const PairDriver&) = delete;
  PairDriver& operator=(const PairDriver&) = delete;

  std::uint16_t qp() const { return qp_; }
  std::uint64_t sent() const { return sent_.load(); }
  std::uint64_t received() const { return received_.load(); }
  std::uint64_t errors() const { return errors_.load(); }
  std::uint64_t drops() const { return total_drops() - drops_at_start_; }
  std::string first_error() const {
    std::lock_guard lk(mu_);
    return first_error_;
  }

  // Waits until `n` more frames than now have come back.
  bool wait_progress(std::uint64_t n, std::chrono::milliseconds timeout = kDeadline) const {
    const std::uint64_t target = received() + n;
    return eventually([&] { return received() >= target || errors() != 0; }, timeout) &&
           errors() == 0;
  }

  // Stops sending and waits until every frame sent came back or was counted as dropped by the
  // device; then ends the thread. True if everything was accounted for.
  bool stop(std::chrono::milliseconds timeout = kDeadline) {
    sending_.store(false);
    // A burst the thread began before it saw the flag still counts: wait for it to say so.
    const bool drained = eventually([&] { return send_stopped_.load(); }, timeout) &&
                         eventually([&] { return received() + drops() >= sent(); }, timeout);
    join();
    return drained;
  }

  // Drops counted by every device the pair runs on (see the second constructor).
  std::uint64_t total_drops() const {
    std::uint64_t n = 0;
    for (const net::NetDevice* d : devs_) n += d->stats(qp_).tx_drops;
    return n;
  }

  // Summary for failure messages.
  std::string describe() const {
    return fmt::format("pair {}: sent {} received {} device drops {} errors {} ({})", qp_, sent(),
                       received(), drops(), errors(), first_error());
  }

 private:
  void join() {
    quit_.store(true);
    if (thread_.joinable()) thread_.join();
  }

  void error(std::string what) {
    if (errors_.fetch_add(1) == 0) {
      std::lock_guard lk(mu_);
      first_error_ = std::move(what);
    }
  }

  void check(std::span<const std::uint8_t> f) {
    const std::uint64_t n = received_.load();
    if (f.size() < kFrameHead) return error(fmt::format("frame {} is {} bytes", n, f.size()));
    std::uint16_t qp = 0;
    std::uint32_t seq = 0, sum = 0;
    std::memcpy(&qp, f.data() + 14, 2);
    std::memcpy(&seq, f.data() + 16, 4);
    std::memcpy(&sum, f.data() + 20, 4);
    const auto me = pair_mac(qp_);
    // The loopback swapped the addresses.
    if (std::memcmp(f.data(), me.data(), 6) != 0 ||
        std::memcmp(f.data() + 6, kLoopMac.data(), 6) != 0) {
      return error(fmt::format("frame {}: addresses not those sent, swapped", n));
    }
    if (qp != qp_) return error(fmt::format("frame {}: came from pair {}", n, qp));
    if (f.size() != frame_len(seq) || sum != frame_sum(f)) {
      return error(fmt::format("frame {} (seq {}): {} bytes, checksum {:#x}: corrupted", n, seq,
                               f.size(), sum));
    }
    if (seq >= sent_.load()) return error(fmt::format("seq {} was never sent", seq));
    if (exact_ ? seq != next_seq_ : seq < next_seq_) {
      return error(fmt::format("seq {} after {}: {}", seq, next_seq_,
                               seq < next_seq_ ? "duplicated or reordered" : "frames lost"));
    }
    next_seq_ = seq + 1;
    if (observer_) observer_(seq, f);
    received_.fetch_add(1);
  }

  void run() {
    while (!quit_.load()) {
      bool did = false;
      const bool sending = sending_.load();
      if (!sending) send_stopped_.store(true);
      const std::uint64_t in_flight = sent() - received() - drops();
      if (sending && in_flight + kBurst <= kWindow) {
        const std::uint32_t first = static_cast<std::uint32_t>(sent());
        // sent_ moves only after the ring has the frames: a frame can't come back before
        // sent_ covers it, as check() assumes.
        const std::size_t n =
            s_.tx_burst_fill(qp_, kBurst, [&](std::size_t i, std::span<std::uint8_t> room) {
              return write_frame(qp_, first + static_cast<std::uint32_t>(i), room);
            });
        sent_.fetch_add(n);
        did = n != 0;
      }
      const std::size_t got =
          s_.rx_burst(qp_, 64, [&](std::span<const std::uint8_t> f) { check(f); });
      did = did || got != 0;
      // Nothing to do: sleep until the device calls (or a while, when the ring is stopped).
      if (!did) s_.wait_call(NetDriver::rx_index(qp_), 20ms);
    }
  }

  NetDriver& s_;
  const std::vector<net::NetDevice*> devs_;
  const std::uint16_t qp_;
  const bool exact_;
  const Observer observer_;
  const std::uint64_t drops_at_start_;
  std::uint32_t next_seq_ = 0;  // driver thread only
  std::atomic<std::uint64_t> sent_{0}, received_{0}, errors_{0};
  std::atomic<bool> sending_{true}, send_stopped_{false}, quit_{false};
  mutable std::mutex mu_;
  std::string first_error_;
  std::thread thread_;
};

// ---- the back-end --------------------------------------------------------------------------

struct StopFd {
  UniqueFd fd{::eventfd(0, EFD_CLOEXEC)};
  void fire() {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(fd.get(), &one, sizeof one);
  }
};

// vhostkit-net --loopback in this process: a NetDevice with a worker per queue pair and a
// BackendServer listening on a fresh socket path, served on its own thread.
struct NetBackend {
  explicit NetBackend(std::uint16_t pairs, const char* tag = "net")
      : path(temp_sock(tag)),
        net(net::NetOptions{.queue_pairs = pairs}),
        device(
            net,
            vhost::DeviceOptions{.name = tag, .unpinned_workers = pairs, .queues_per_worker = 2}),
        server(device, server_options(path, pairs)) {
    thread = std::thread([this] { result = server.run(stop.fd.get()); });
    listening = eventually([&] { return testing::unix_listening(path); });
  }
  ~NetBackend() {
    stop.fire();
    if (thread.joinable()) thread.join();
  }

  static vhost_user::ServerOptions server_options(const std::string& path, std::uint16_t pairs) {
    auto o = vhost_user::ServerOptions::listen(path);
    o.session.queue_num = pairs;
    o.session.name = "live";
    return o;
  }

  // A front-end on this back-end with `pairs` queue pairs and the given extra protocol features.
  // `ring` asks for a layout; the back-end offers both.
  Result<std::unique_ptr<NetDriver>> connect(
      std::uint16_t pairs, std::uint64_t extra_protocol = 0,
      vhost_user::RingLayout ring = vhost_user::RingLayout::split) {
    driver::NetDriverOptions o;
    o.socket_path = path;
    o.ring = ring;
    o.queue_pairs = pairs;
    o.memory_size = 0;
    o.protocol_features |= extra_protocol;
    o.timeout = 15s;
    return NetDriver::connect(std::move(o));
  }

  std::string path;
  net::NetDevice net;
  vhost::Device device;
  vhost_user::BackendServer server;
  StopFd stop;
  Result<> result;
  bool listening = false;
  std::thread thread;
};

// SET_VRING_ADDR for ring i of `s` as it is, with or without VHOST_VRING_F_LOG. Split: the
// descriptor table, avail and used rings; packed: the descriptor ring, the driver and the device
// event areas in their places. The log address is what QEMU gives: its "used" address (the used
// ring; for a packed ring the device event area).
inline vhost_user::SetVringAddr vring_addr(const vhost_user::FrontendSession& s, std::uint16_t i,
                                           bool log) {
  const vhost_user::FrontendRing& r = s.ring(i);
  const auto uva = [&](std::uint64_t gpa) {
    return reinterpret_cast<std::uint64_t>(s.memory().data()) + gpa;
  };
  const std::uint64_t desc = r.packed ? r.pvq.desc_gpa() : r.vq.desc_gpa();
  const std::uint64_t avail = r.packed ? r.pvq.driver_event_gpa() : r.vq.avail_gpa();
  const std::uint64_t used = r.packed ? r.pvq.device_event_gpa() : r.vq.used_gpa();
  return vhost_user::SetVringAddr{.index = i,
                                  .addr = {.flags = log ? virtio::kVhostVringFLog : 0u,
                                           .desc_user_addr = uva(desc),
                                           .used_user_addr = uva(used),
                                           .avail_user_addr = uva(avail),
                                           .log_guest_addr = log ? used : 0}};
}

// ---- a second control channel on the front-end's socket ------------------------------------

// Speaks for the front-end on its own socket (a dup of it) while the NetDriver's data path
// runs: the session's control path is idle after connect(), so replies reach only us.
class Control {
 public:
  explicit Control(int session_fd) : ch_(UniqueFd(::dup(session_fd))) {
    // The dup shares the socket: this sets the session's timeouts too, to the same value.
    (void)ch_.set_timeout(15s);
  }
  // A connection of its own: the front-end side of a second back-end (a migration's destination).
  explicit Control(vhost_user::Channel ch) : ch_(std::move(ch)) { (void)ch_.set_timeout(15s); }

  // Sends `msg` without NEED_REPLY (before REPLY_ACK is negotiated).
  template <typename T>
  Result<> send(const T& msg) {
    return ch_.send_message(msg);
  }

  // GET_FEATURES / GET_PROTOCOL_FEATURES.
  Result<std::uint64_t> query(vhost_user::Request req) {
    Result<> sent = req == vhost_user::Request::get_features
                        ? ch_.send_message(vhost_user::GetFeatures{})
                        : ch_.send_message(vhost_user::GetProtocolFeatures{});
    if (!sent) return std::unexpected(sent.error());
    auto reply = ch_.recv();
    if (!reply) return std::unexpected(reply.error());
    return vhost_user::decode_u64_reply(*reply, req);
  }

  // Sends `msg` with NEED_REPLY and waits for a successful REPLY_ACK.
  template <typename T>
  Result<> request(const T& msg) {
    const auto what = vhost_user::to_string(T::kRequest);
    if (auto r = ch_.send_message(msg, vhost_user::kNeedReplyFlag); !r) {
      return fail(r.error().code, fmt::format("{}: {}", what, r.error().message()));
    }
    auto reply = ch_.recv();
    if (!reply)
      return fail(reply.error().code, fmt::format("{} ack: {}", what, reply.error().message()));
    auto v = vhost_user::decode_u64_reply(*reply, T::kRequest);
    if (!v) return fail(v.error().code, fmt::format("{} ack: {}", what, v.error().message()));
    if (*v != 0)
      return fail(Errc::invalid_argument, fmt::format("{} refused (ack {:#x})", what, *v));
    return {};
  }

  Result<std::uint32_t> get_vring_base(std::uint16_t ring) {
    if (auto r = ch_.send_message(vhost_user::GetVringBase{.index = ring, .num = 0}); !r) {
      return std::unexpected(r.error());
    }
    auto reply = ch_.recv();
    if (!reply) return std::unexpected(reply.error());
    auto st = vhost_user::decode_vring_state_reply(*reply, vhost_user::Request::get_vring_base);
    if (!st) return std::unexpected(st.error());
    if (st->index != ring) return fail(Errc::broken, fmt::format("reply names ring {}", st->index));
    return st->num;
  }

  // What QEMU sends to start a ring again after GET_VRING_BASE stopped it (vhost_virtqueue_start,
  // then vhost_user_set_vring_enable): size, base, addresses, kick, call, enable. The kick and
  // call fds are the session's own eventfds, so its data path goes on as before.
  Result<> restart_ring(vhost_user::FrontendSession& s, std::uint16_t i, std::uint32_t base) {
    const vhost_user::FrontendRing& r = s.ring(i);
    if (auto e = request(vhost_user::SetVringNum{.index = i, .num = s.queue_size()}); !e) return e;
    if (auto e = request(vhost_user::SetVringBase{.index = i, .num = base}); !e) return e;
    if (auto e = request(vring_addr(s, i, /*log=*/false)); !e) return e;
    vhost_user::SetVringKick kick{.index = static_cast<std::uint8_t>(i),
                                  .fd = UniqueFd(::dup(r.kick.get()))};
    if (auto e = request(kick); !e) return e;
    vhost_user::SetVringCall call{.index = static_cast<std::uint8_t>(i),
                                  .fd = UniqueFd(::dup(r.call.get()))};
    if (auto e = request(call); !e) return e;
    return request(vhost_user::SetVringEnable{.index = i, .num = 1});
  }

 private:
  vhost_user::Channel ch_;
};

// The fd of the memfd that backs `mem` (a FrontendSession's memory): found through the mapping's
// device and inode in /proc/self/maps and the fd with the same in /proc/self/fd, then dup'ed.
inline UniqueFd memfd_of(std::span<const std::uint8_t> mem) {
  FILE* maps = std::fopen("/proc/self/maps", "re");
  if (maps == nullptr) return {};
  const auto start = reinterpret_cast<std::uintptr_t>(mem.data());
  unsigned maj = 0, min = 0;
  unsigned long long ino = 0;
  bool found = false;
  char line[512];
  while (!found && std::fgets(line, sizeof line, maps) != nullptr) {
    unsigned long long lo = 0, hi = 0, off = 0;
    char perms[8];
    if (std::sscanf(line, "%llx-%llx %7s %llx %x:%x %llu", &lo, &hi, perms, &off, &maj, &min,
                    &ino) == 7 &&
        lo == start) {
      found = true;
    }
  }
  std::fclose(maps);
  if (!found) return {};
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return {};
  UniqueFd out;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    struct stat st{};
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_ino == ino &&
        major(st.st_dev) == maj && minor(st.st_dev) == min) {
      out.reset(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
      break;
    }
  }
  ::closedir(d);
  return out;
}

}  // namespace vhostkit::live

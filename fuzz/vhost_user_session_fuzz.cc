// Fuzzes BackendSession with sequences of front-end messages over a socketpair, on a device
// with an echo backend, down to its data path: the harness is also the guest, with real memory
// (a memfd the device maps), rings whose descriptor chains come from the input (good and bad),
// and kick eventfds it writes so the device's worker pops chains and pushes used elements.
// Must not crash or hang; after the session closes every ring is stopped, no guest memory is
// mapped by the device any more (the device has no region, /proc/self/maps shows no memfd
// mapping beyond the harness's own) and no fd leaked.
//
// Input: records of
//   u8  request number; 0xf0..0xf3 are harness actions (below), other values are sent as is
//   u8  flag selector: bit 0 NEED_REPLY, bit 1 REPLY (illegal from a front-end), bit 2 version 0;
//       for an action: bit 0 the queue, the rest action options
//   u16 payload length (little-endian; over 300 is clamped)
//   u8  fd selector: bits 0-3 fd count (0..9); bit 5 dups of the guest memfd, else bit 4
//       eventfds, else fresh 64 KiB memfds (ignored by actions)
//   payload bytes (as many as remain, up to the length)
// Actions, each a well-formed message sequence (fuzzed options) through the same socket:
//   0xf0 memory: SET_OWNER, SET_FEATURES, [SET_PROTOCOL_FEATURES,] SET_MEM_TABLE of the guest
//        memfd. sel bit 1 EVENT_IDX, bit 2 INDIRECT_DESC, bit 3 PROTOCOL_FEATURES (+ REPLY_ACK
//        and the rest), bit 4 no SET_OWNER. payload[0]: the table: % 4: one region; two split
//        at kSplit; the same two in reverse order; only the first of the two (the rest of
//        memory unmapped); bit 2: one region twice the memfd's size (must be refused).
//   0xf1 ring q: SET_VRING_NUM/BASE/ADDR/CALL/ERR/KICK/ENABLE with the ring at its fixed place,
//        zeroed. payload[0]: size 8 << (b & 3); bit 2: base = le16 payload[1..2] (else 0);
//        bit 3: log flag in SET_VRING_ADDR; bit 4: call "no fd"; bit 5: no err fd; bit 6:
//        enable 0.
//   0xf2 fill q: writes descriptors and makes chains available. payload: u8 n, n descriptors
//        of 6 bytes (le16 address: below 0xff00 kData + 4 * v, else one of kOddAddrs; le16
//        length: below 0xfff0 as is, else one of kOddLens; u8 flags; u8 next), u8 heads, that
//        many head bytes (below 0xf8 modulo the ring size, else as is), the rest copied to
//        kData (indirect tables). The avail index moves by `heads` (more than the ring size
//        is a runaway the device must catch).
//   0xf3 kick q: writes the ring's kick eventfd and waits until the worker has taken every
//        chain, or the ring is stopped or broken. Where the harness knows the ring (its own
//        memory table and ring setup; no raw request that moves memory, a ring, a kick or the
//        dirty log; no descriptor so far that lets the device write over a ring), not draining
//        within 30 s is a finding; otherwise the input waits at most 10 ms in all, silently.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include <spdlog/spdlog.h>

#include "fuzz_util.h"
#include "testing/fd_count.h"
#include "testing/raw_send.h"
#include "vhostkit/vhost/backend.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"
#include "vhostkit/virtq/split_queue.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::vhost_user;
using fuzz::Reader;
using virtio::bit;

// Guest memory: ring q's descriptor table, avail and used rings at q * kRingStride (room for the
// largest ring the actions make, 64), then the data area.
constexpr std::size_t kGuestBytes = 128 << 10;
constexpr std::uint64_t kRingStride = 0x4000;
constexpr std::uint64_t kAvailOff = 0x1000;
constexpr std::uint64_t kUsedOff = 0x2000;
constexpr std::uint64_t kData = 0x8000;
constexpr std::uint64_t kSplit = kData + 0x4000;  // where the two-region tables split
constexpr std::uint64_t kUva = 0x7f0000000000;    // the "front-end's" address of gpa 0
constexpr std::uint16_t kQueues = 2;
constexpr const char* kGuestName = "vk-session-guest";
static_assert(kQueues * kRingStride <= kData, "the rings lie before the data area");

constexpr std::uint64_t kOddAddrs[] = {
    0,                        // queue 0's descriptor table
    kAvailOff,                // queue 0's avail ring
    kUsedOff,                 // queue 0's used ring
    kRingStride + kAvailOff,  // queue 1's avail ring
    kGuestBytes - 1,          // the last byte
    kGuestBytes,              // one past the end
    ~std::uint64_t{0} - 7,    // wraps
    kSplit - 8,               // across the two regions of a split table
};
constexpr std::uint32_t kOddLens[] = {
    0,  1, 16,       17,  4096, 0x7ffff000, 0x80000000u, 0xffffffffu, kGuestBytes, kGuestBytes + 1,
    48, 3, 1u << 20, 160, 15,   32};

constexpr auto kHangDeadline = std::chrono::seconds(30);
// What one input may spend waiting on rings the harness can't vouch for.
constexpr auto kLooseBudget = std::chrono::milliseconds(10);

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "vhost_user_session_fuzz: %s\n", what);
  std::abort();
}

class Echo : public vhost::DeviceBackend {
 public:
  std::uint64_t features() const noexcept override {
    return bit(virtio::feature::version_1) | bit(virtio::feature::ring_event_idx) |
           bit(virtio::feature::ring_indirect_desc);
  }
  std::uint16_t num_queues() const noexcept override { return kQueues; }
  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override {
    if (offset > 8 || out.size() > 8 - offset) return fail(Errc::out_of_range, "past config");
    std::memset(out.data(), 0x5a, out.size());
    return {};
  }
  bool handle_queue(vhost::Queue& q) noexcept override {
    auto& vq = q.vq();
    std::array<iovec, 8> segs;
    bool did = false;
    for (int n = 0; n < 16 && vq.pending() > 0; ++n) {
      did = true;
      auto c = vq.pop(segs);
      if (!c) {
        if (virtq::breaks_queue(c.error())) break;
        continue;  // answered with used len 0 by pop
      }
      std::uint32_t len = 0;
      if (!c->readable.empty() && !c->writable.empty()) {
        len = static_cast<std::uint32_t>(std::min(c->readable[0].iov_len, c->writable[0].iov_len));
        std::memmove(c->writable[0].iov_base, c->readable[0].iov_base, len);
      }
      vq.push_used(c->head, len);
    }
    if (did) q.publish_and_notify();
    return did;
  }
};

UniqueFd make_eventfd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }
UniqueFd dup_fd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

void drain_eventfd(int fd) {
  std::uint64_t v;
  [[maybe_unused]] auto n = ::read(fd, &v, sizeof v);
}

// Process-wide: the guest's memory (mapped here too: the harness writes rings through it) and
// each ring's kick, call and err eventfds (the device gets dups).
struct Guest {
  UniqueFd memfd;
  std::uint8_t* mem = nullptr;
  std::array<UniqueFd, kQueues> kick, call, err;

  Guest() {
    memfd = UniqueFd(::memfd_create(kGuestName, MFD_CLOEXEC));
    if (!memfd || ::ftruncate(memfd.get(), kGuestBytes) != 0) finding("guest memfd");
    void* m = ::mmap(nullptr, kGuestBytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
    if (m == MAP_FAILED) finding("guest mmap");
    mem = static_cast<std::uint8_t*>(m);
    for (std::uint16_t q = 0; q < kQueues; ++q) {
      kick[q] = make_eventfd();
      call[q] = make_eventfd();
      err[q] = make_eventfd();
      if (!kick[q] || !call[q] || !err[q]) finding("eventfd");
    }
  }
  // Left over from the last input (a kick the device never read, a call nobody waited for).
  void quiet() {
    for (std::uint16_t q = 0; q < kQueues; ++q) {
      drain_eventfd(kick[q].get());
      drain_eventfd(call[q].get());
      drain_eventfd(err[q].get());
    }
  }
  static std::uint64_t ring(std::uint16_t q) { return q * kRingStride; }
  virtio::VirtqDesc* desc(std::uint16_t q) {
    return reinterpret_cast<virtio::VirtqDesc*>(mem + ring(q));
  }
  virtio::VirtqAvail* avail(std::uint16_t q) {
    return reinterpret_cast<virtio::VirtqAvail*>(mem + ring(q) + kAvailOff);
  }
};

// What the harness did in this input, to know whether a ring should drain after a kick.
struct Model {
  bool mem_ok = false;                  // our memory table was sent
  std::array<bool, kQueues> ring_ok{};  // our setup of the ring was sent
  // A raw request that can move memory, a ring or its kick, or point the dirty log at guest
  // memory was sent: from then on either ring may lie anywhere, over the other's avail index.
  bool tampered = false;
  // A ring was kicked with buffers over the rings: the device may still be writing there.
  bool scribbled = false;
  std::array<std::uint16_t, kQueues> size{};   // ring size we set (0: none yet)
  std::array<std::uint16_t, kQueues> avail{};  // avail->idx we published
  std::chrono::nanoseconds loose_waited{0};
};

// Counts the memfd mappings in this process (the harness's own guest mapping and whatever the
// device mapped).
std::size_t memfd_mappings() { return vhostkit::testing::mapping_count("/memfd:"); }

int make_raw_fd(std::uint8_t fdsel, const Guest& g) {
  if (fdsel & 0x20) return ::fcntl(g.memfd.get(), F_DUPFD_CLOEXEC, 0);
  if (fdsel & 0x10) return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const int fd = ::memfd_create("fuzz-raw", MFD_CLOEXEC);
  if (fd >= 0 && ::ftruncate(fd, 64 << 10) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// The header as the input says, whatever its size field claims; never blocks on a back-end that
// stopped reading.
void send_record(int sock, std::uint32_t request, std::uint32_t flags, const std::uint8_t* payload,
                 std::size_t len, const std::vector<int>& fds) {
  const Header h{request, flags, static_cast<std::uint32_t>(len)};
  (void)test::send_raw(sock, h, std::span<const std::uint8_t>(payload, len), fds, MSG_DONTWAIT);
}

// Reads and drops whatever the back-end replied, so the socket never fills up.
void drain(int sock) {
  std::uint8_t buf[4096];
  while (::recv(sock, buf, sizeof buf, MSG_DONTWAIT) > 0) {
  }
}

// One front-end connection and the harness's side of it.
class Run {
 public:
  Run(vhost::Device& dev, Guest& g, BackendSession& s, Channel& fe)
      : dev_(dev), g_(g), session_(s), fe_(fe) {}

  // Sends one message and has the session serve it. False once the session has ended.
  template <typename T>
  bool send(const T& msg) {
    if (!fe_.send_message(msg)) return false;
    auto r = session_.serve_one();
    drain(fe_.fd());
    return r.has_value();
  }
  bool raw(std::uint8_t req, std::uint8_t sel, const std::uint8_t* payload, std::size_t len,
           std::uint8_t fdsel) {
    std::uint32_t flags = (sel & 4) ? 0 : kVersion;
    if (sel & 1) flags |= kNeedReplyFlag;
    if (sel & 2) flags |= kReplyFlag;
    std::vector<int> fds;
    const unsigned nfds = std::min<unsigned>(fdsel & 0x0f, 9);
    for (unsigned i = 0; i < nfds; ++i) {
      const int fd = make_raw_fd(fdsel, g_);
      if (fd >= 0) fds.push_back(fd);
    }
    send_record(fe_.fd(), req, flags, payload, len, fds);
    for (int fd : fds) ::close(fd);  // the session has its own copies now
    forget(static_cast<Request>(req));
    auto r = session_.serve_one();
    drain(fe_.fd());
    return r.has_value();
  }

  bool setup_memory(std::uint8_t sel, Reader in) {
    const std::uint8_t v = in.u8();
    std::uint64_t features = bit(virtio::feature::version_1);
    if (sel & 2) features |= bit(virtio::feature::ring_event_idx);
    if (sel & 4) features |= bit(virtio::feature::ring_indirect_desc);
    if (sel & 8) features |= bit(virtio::feature::protocol_features);
    if (!(sel & 16) && !send(SetOwner{})) return false;
    if (!send(SetFeatures{features & dev_.offered_features()})) return false;
    if ((sel & 8) && !send(SetProtocolFeatures{session_.offered_protocol_features()})) {
      return false;
    }
    SetMemTable t;
    auto region = [&](std::uint64_t gpa, std::uint64_t size) {
      t.regions.push_back(
          memory::RegionFd{memory::RegionSpec{gpa, size, kUva + gpa, gpa}, dup_fd(g_.memfd.get())});
    };
    if (v & 4) {
      region(0, 2 * kGuestBytes);
    } else {
      switch (v % 4) {
        case 0: region(0, kGuestBytes); break;
        case 1:
          region(0, kSplit);
          region(kSplit, kGuestBytes - kSplit);
          break;
        case 2:
          region(kSplit, kGuestBytes - kSplit);
          region(0, kSplit);
          break;
        default: region(0, kSplit); break;
      }
    }
    model_.mem_ok = true;
    return send(t);
  }

  bool setup_ring(std::uint16_t q, Reader in) {
    const std::uint8_t o = in.u8();
    const std::uint16_t base = (o & 4) ? in.u16() : 0;
    const std::uint16_t size = static_cast<std::uint16_t>(8u << (o & 3));
    std::memset(g_.mem + Guest::ring(q), 0, kRingStride);
    model_.size[q] = size;
    model_.avail[q] = 0;
    model_.ring_ok[q] = true;
    SetVringAddr a;
    a.index = q;
    a.addr.flags = (o & 8) ? virtio::kVhostVringFLog : 0;
    a.addr.desc_user_addr = kUva + Guest::ring(q);
    a.addr.avail_user_addr = kUva + Guest::ring(q) + kAvailOff;
    a.addr.used_user_addr = kUva + Guest::ring(q) + kUsedOff;
    SetVringCall call;
    call.index = static_cast<std::uint8_t>(q);
    if (!(o & 16)) call.fd = dup_fd(g_.call[q].get());
    SetVringKick kick;
    kick.index = static_cast<std::uint8_t>(q);
    kick.fd = dup_fd(g_.kick[q].get());
    if (!send(SetVringNum{q, size}) || !send(SetVringBase{q, base}) || !send(a) || !send(call)) {
      return false;
    }
    if (!(o & 32)) {
      SetVringErr err;
      err.index = static_cast<std::uint8_t>(q);
      err.fd = dup_fd(g_.err[q].get());
      if (!send(err)) return false;
    }
    return send(kick) && send(SetVringEnable{q, (o & 64) ? 0u : 1u});
  }

  void fill(std::uint16_t q, Reader in) {
    const std::uint16_t size = model_.size[q] != 0 ? model_.size[q] : 8;
    virtio::VirtqDesc* desc = g_.desc(q);
    const unsigned n = std::min<unsigned>(in.u8(), size);
    for (unsigned i = 0; i < n; ++i) {
      const std::uint16_t a = in.u16();
      const std::uint16_t l = in.u16();
      desc[i].addr = a < 0xff00 ? kData + 4u * a : kOddAddrs[a % std::size(kOddAddrs)];
      desc[i].len = l < 0xfff0 ? l : kOddLens[l % std::size(kOddLens)];
      desc[i].flags = in.u8();
      desc[i].next = in.u8();
    }
    virtio::VirtqAvail* avail = g_.avail(q);
    const unsigned heads = in.u8();
    for (unsigned i = 0; i < heads; ++i) {
      const std::uint8_t h = in.u8();
      avail->ring[(model_.avail[q] + i) % size] = h < 0xf8 ? h % size : h;
    }
    const std::size_t rest = std::min(in.n, kGuestBytes - kData);
    std::memcpy(g_.mem + kData, in.p, rest);
    model_.avail[q] = static_cast<std::uint16_t>(model_.avail[q] + heads);
    // With EVENT_IDX, ask for a call once the last chain is answered (as a driver would).
    *virtq::used_event_word(avail, size) = static_cast<std::uint16_t>(model_.avail[q] - 1);
    // Release: the descriptors and ring entries above are visible before the new index.
    std::atomic_ref<std::uint16_t>(avail->idx).store(model_.avail[q], std::memory_order_release);
  }

  void kick(std::uint16_t q) {
    const std::uint64_t one = 1;
    if (::write(g_.kick[q].get(), &one, sizeof one) != sizeof one) finding("kick write");
    if (may_write_rings()) model_.scribbled = true;
    const bool strict = model_.mem_ok && model_.ring_ok[q] && !model_.tampered && !model_.scribbled;
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      if (drained(q)) break;
      const auto waited = std::chrono::steady_clock::now() - start;
      if (strict && waited > kHangDeadline) {
        finding("a kicked ring neither drained nor stopped nor broken within 30 s");
      }
      if (!strict && model_.loose_waited + waited > kLooseBudget) break;
      // The device signals call when it publishes (the used event asks for the last chain) and
      // err when the ring breaks; the drained() check decides, the signal only wakes us early.
      pollfd p[2] = {{g_.call[q].get(), POLLIN, 0}, {g_.err[q].get(), POLLIN, 0}};
      if (::poll(p, 2, 1) > 0) {
        drain_eventfd(g_.call[q].get());
        drain_eventfd(g_.err[q].get());
      }
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (!strict) model_.loose_waited += waited;
    if (verbose_) report(q, strict, waited);
  }

 private:
  void forget(Request req) {
    switch (req) {
      case Request::set_mem_table:
      case Request::add_mem_reg:
      case Request::rem_mem_reg:
      case Request::set_log_base:
      case Request::set_vring_num:
      case Request::set_vring_addr:
      case Request::set_vring_kick: model_.tampered = true; break;
      default: break;
    }
  }

  // Can a buffer the device may follow (in either ring's table, or an indirect table one of
  // those points to) lie over the rings? The echo device writes into such buffers as told, so
  // the guest's own avail index may change under the harness.
  bool may_write_rings() const {
    for (std::uint16_t q = 0; q < kQueues; ++q) {
      if (fuzz::buffers_may_hit_rings(g_.mem, kGuestBytes, Guest::ring(q), 64, kData)) return true;
    }
    return false;
  }

  // SESSION_FUZZ_VERBOSE=1 (running one input by hand): what the device made of a kick.
  void report(std::uint16_t q, bool strict, std::chrono::nanoseconds waited) {
    bool started = false, broken = false;
    std::uint16_t taken = 0, used = 0;
    std::uint64_t bad = 0;
    dev_.worker_for(q).run_sync([&] {
      vhost::Queue& ring = dev_.queue(q);
      started = ring.started();
      broken = ring.broken();
      taken = ring.vq().last_avail_idx();
      used = ring.vq().used_idx();
      for (std::uint64_t e : ring.vq().errors()) bad += e;
    });
    std::fprintf(stderr,
                 "session_fuzz: kick q%u %s: %s%s, avail %u taken %u used %u bad chains %llu, "
                 "waited %lld us\n",
                 q, strict ? "strict" : "loose", started ? "started" : "stopped",
                 broken ? " broken" : "", model_.avail[q], taken, used,
                 static_cast<unsigned long long>(bad),
                 static_cast<long long>(waited.count() / 1000));
  }

  // On the ring's worker, where its state lives: stopped, broken, or every chain we made
  // available taken (popped and, by the echo device, answered and published).
  bool drained(std::uint16_t q) {
    bool done = false;
    dev_.worker_for(q).run_sync([&] {
      vhost::Queue& ring = dev_.queue(q);
      done = !ring.started() || ring.broken() || ring.vq().broken() ||
             ring.vq().last_avail_idx() == model_.avail[q];
    });
    return done;
  }

  vhost::Device& dev_;
  Guest& g_;
  BackendSession& session_;
  Channel& fe_;
  Model model_;
  bool verbose_ = std::getenv("SESSION_FUZZ_VERBOSE") != nullptr;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static bool init = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)init;
  static Guest guest;
  static Echo backend;
  static vhost::Device device(backend, vhost::DeviceOptions{.name = "fuzz"});

  guest.quiet();
  std::memset(guest.mem, 0, kGuestBytes);
  const std::size_t fds_before = vhostkit::testing::vhostkit_fd_count();
  const std::size_t maps_before = memfd_mappings();
  {
    auto pair = socketpair();
    if (!pair) return 0;
    Channel fe = std::move(pair->second);
    SessionOptions opts;
    opts.set_mtu = [](std::uint16_t) -> Result<> { return {}; };
    opts.send_rarp = [](const Mac&) -> Result<> { return {}; };
    BackendSession session(device, std::move(pair->first), opts);
    Run run(device, guest, session, fe);
    std::size_t pos = 0;
    bool alive = true;
    for (int records = 0; alive && records < 64 && pos + 5 <= size; ++records) {
      const std::uint8_t req = data[pos];
      const std::uint8_t sel = data[pos + 1];
      std::size_t len = data[pos + 2] | (std::size_t{data[pos + 3]} << 8);
      const std::uint8_t fdsel = data[pos + 4];
      pos += 5;
      len = std::min({len, std::size_t{300}, size - pos});
      const Reader payload{data + pos, len};
      const std::uint16_t q = sel & 1;
      switch (req) {
        case 0xf0: alive = run.setup_memory(sel, payload); break;
        case 0xf1: alive = run.setup_ring(q, payload); break;
        case 0xf2: run.fill(q, payload); break;
        case 0xf3: run.kick(q); break;
        default: alive = run.raw(req, sel, data + pos, len, fdsel); break;
      }
      pos += len;
    }
    session.close();
  }
  // After the session: the device is reset, its mappings are gone, every fd it got is closed.
  for (std::uint16_t q = 0; q < kQueues; ++q) {
    if (device.queue(q).started()) finding("a ring still runs after the session closed");
  }
  if (device.memory().region_count() != 0) finding("guest memory kept after the session closed");
  if (memfd_mappings() != maps_before) finding("a memfd is still mapped after the session closed");
  if (vhostkit::testing::vhostkit_fd_count() != fds_before) {
    std::fprintf(stderr, "fd leak: %zu open fds after the input, %zu before\n",
                 vhostkit::testing::vhostkit_fd_count(), fds_before);
    vhostkit::testing::vhostkit_fd_count(true);
    finding("fd leak");
  }
  return 0;
}

// Fuzzes the virtio-blk request path as a hostile guest drives it: a BlkDevice behind a real
// vhost::Device (worker thread, kick eventfd) on guest memory whose ring and request bytes come
// from the input. Every request the guest makes available must be answered (a used element) or
// the ring marked broken (a hang is a finding only after 30 s: the host may be loaded, and a
// normal input takes milliseconds); the image never changes size, a read-only image never
// changes, no used element names a head outside the ring, and no fd leaks. (The used-ring checks
// are skipped for an input with a buffer over the rings: the device writes where it is told.)
//
// Input:
//   byte 0   bits 0-1: queue size 8 << b; bit 2: read-only image; bit 3: io_uring (else inline
//            calls); bit 4: ack DISCARD and WRITE_ZEROES; bit 5: ack INDIRECT_DESC; bit 6: ack
//            EVENT_IDX
//   byte 1   requests made available: 1 + b % queue size
//   then per descriptor (queue size of them), 6 bytes:
//     le16 address: below 0xff00, kData + 4 * v; else one of kOddAddrs (outside or at the edge
//          of guest memory, wrapping)
//     le16 length: below 0xfff0 as is; else one of kOddLens
//     u8   flags (NEXT, WRITE, INDIRECT; other bits kept: the device must ignore them)
//     u8   next (as is: may be out of range)
//   then per request one byte: its head (below 0xf8: modulo the queue size; else out of range)
//   rest     copied to guest memory at kData (request headers, discard segments, indirect tables)
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "fuzz_util.h"
#include "testing/fd_count.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"
#include "vhostkit/virtq/split_queue.h"

namespace {

using namespace vhostkit;
using virtio::bit;
namespace bf = virtio::blk_feature;
using fuzz::Reader;

constexpr std::size_t kGuestBytes = 512 << 10;
constexpr std::uint64_t kDescGpa = 0x0000;
constexpr std::uint64_t kAvailGpa = 0x1000;
constexpr std::uint64_t kUsedGpa = 0x2000;
constexpr std::uint64_t kData = 0x10000;
constexpr std::size_t kImageBytes = 64 << 10;  // 128 sectors

constexpr std::uint64_t kOddAddrs[] = {
    0,                      // the descriptor table itself
    kGuestBytes - 1,        // the last byte of guest memory
    kGuestBytes - 16,       // a header that runs off the end
    kGuestBytes,            // one past the end
    kGuestBytes + 4096,     // unmapped
    ~std::uint64_t{0} - 7,  // wraps
    std::uint64_t{1} << 63,
    kUsedGpa,  // the used ring
};
constexpr std::uint32_t kOddLens[] = {
    0,
    1,
    15,
    16,
    17,
    511,
    513,
    4096 + 1,
    0x7ffff000,
    0x80000000u,
    0xffffffffu,
    kGuestBytes,
    kGuestBytes + 1,
    1u << 20,
    3,
    520,
};

// How long a request may go unanswered before it counts as a hang: far beyond any scheduling
// delay on a loaded host. Inputs that finish wait only for their answers.
constexpr auto kHangDeadline = std::chrono::seconds(30);
// An input whose buffers lie over the rings may scribble its own used index; it is only waited
// for until every request was taken, and never longer than this (not a finding).
constexpr auto kAliasedDeadline = std::chrono::seconds(2);

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "blk_request_fuzz: %s\n", what);
  std::abort();
}

// Process-wide fixtures: guest memory, the image (in tmpfs, so both I/O paths work on it),
// its pristine contents, and one BlkDevice per (read-only, I/O path).
struct World {
  int memfd = -1;
  std::uint8_t* guest = nullptr;
  std::string image;
  int image_fd = -1;
  std::vector<std::uint8_t> pristine;
  std::unique_ptr<blk::BlkDevice> devs[2][2];  // [read_only][uring]
  bool verbose = std::getenv("BLK_FUZZ_VERBOSE") != nullptr;

  World() {
    spdlog::set_level(spdlog::level::off);
    memfd = ::memfd_create("blk-fuzz-guest", MFD_CLOEXEC);
    if (memfd < 0 || ::ftruncate(memfd, kGuestBytes) != 0) finding("memfd setup");
    void* m = ::mmap(nullptr, kGuestBytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (m == MAP_FAILED) finding("mmap");
    guest = static_cast<std::uint8_t*>(m);
    char path[] = "/dev/shm/vhostkit-blk-fuzz-XXXXXX";
    image_fd = ::mkstemp(path);
    if (image_fd < 0) finding("mkstemp in /dev/shm");
    image = path;
    pristine.resize(kImageBytes);
    for (std::size_t i = 0; i < kImageBytes; ++i) {
      pristine[i] = static_cast<std::uint8_t>(i * 13 + i / 512);
    }
    restore();
    for (int ro = 0; ro < 2; ++ro) {
      for (int uring = 0; uring < 2; ++uring) {
        blk::BlkOptions o;
        o.image = image;
        o.read_only = ro != 0;
        o.io = uring != 0 ? blk::IoPath::uring : blk::IoPath::inline_call;
        auto d = blk::BlkDevice::open(o);
        if (!d) finding("BlkDevice::open");
        devs[ro][uring] = std::move(*d);
      }
    }
  }
  ~World() { ::unlink(image.c_str()); }

  void restore() {
    if (::pwrite(image_fd, pristine.data(), kImageBytes, 0) != static_cast<ssize_t>(kImageBytes) ||
        ::ftruncate(image_fd, kImageBytes) != 0) {
      finding("restoring the image");
    }
  }
  bool image_is_pristine() {
    std::vector<std::uint8_t> now(kImageBytes);
    return ::pread(image_fd, now.data(), kImageBytes, 0) == static_cast<ssize_t>(kImageBytes) &&
           now == pristine;
  }
  std::uint64_t image_size() {
    struct stat st{};
    if (::fstat(image_fd, &st) != 0) finding("fstat image");
    return static_cast<std::uint64_t>(st.st_size);
  }
  std::uint64_t uva(std::uint64_t gpa) const {
    return reinterpret_cast<std::uint64_t>(guest) + gpa;
  }
};

World& world() {
  static World w;
  return w;
}

// A descriptor the device may follow (in the table, or in an indirect table one of those points
// to) whose buffer starts below the data area, i.e. over the rings. The device writes into such
// buffers as told, so the guest may have scribbled over its own used ring; the used-ring checks
// then prove nothing.
bool may_alias_rings(const World& w, std::uint16_t qsize) {
  return fuzz::buffers_may_hit_rings(w.guest, kGuestBytes, kDescGpa, qsize, kData);
}

std::uint16_t used_idx(const World& w) {
  auto* used = reinterpret_cast<virtio::VirtqUsed*>(w.guest + kUsedGpa);
  return std::atomic_ref<std::uint16_t>(used->idx).load(std::memory_order_acquire);
}

// Sleeps until the device signals call or err, or a few ms pass (a guest may suppress the call,
// and the check that follows decides, not the signal). Drains what fired.
void wait_signal(int call, int err) {
  pollfd p[2] = {{call, POLLIN, 0}, {err, POLLIN, 0}};
  if (::poll(p, 2, 5) <= 0) return;
  std::uint64_t v;
  for (const pollfd& f : p) {
    if (f.revents & POLLIN) {
      [[maybe_unused]] auto n = ::read(f.fd, &v, sizeof v);
    }
  }
}

// On the worker, where the ring state lives: has the device taken every request off the ring
// (or stopped it)?
bool all_taken(vhost::Device& dev, std::uint16_t requests) {
  bool taken = false;
  dev.worker_for(0).run_sync([&] {
    vhost::Queue& q = dev.queue(0);
    taken = !q.started() || q.broken() || q.vq().broken() ||
            static_cast<std::uint16_t>(q.vq().last_avail_idx()) >= requests;
  });
  return taken;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  World& w = world();
  const std::size_t fds_before = vhostkit::testing::vhostkit_fd_count();
  Reader in{data, size};
  const std::uint8_t mode = in.u8();
  const std::uint16_t qsize = static_cast<std::uint16_t>(8u << (mode & 3));
  const bool read_only = (mode & 4) != 0;
  const bool uring = (mode & 8) != 0;
  const std::uint16_t requests = static_cast<std::uint16_t>(1 + in.u8() % qsize);

  // The guest: rings and request bytes.
  std::memset(w.guest, 0, kGuestBytes);
  auto* desc = reinterpret_cast<virtio::VirtqDesc*>(w.guest + kDescGpa);
  for (std::uint16_t i = 0; i < qsize; ++i) {
    const std::uint16_t a = in.u16();
    const std::uint16_t l = in.u16();
    desc[i].addr = a < 0xff00 ? kData + 4u * a : kOddAddrs[a % std::size(kOddAddrs)];
    desc[i].len = l < 0xfff0 ? l : kOddLens[l % std::size(kOddLens)];
    desc[i].flags = in.u8();
    desc[i].next = in.u8();
  }
  auto* avail = reinterpret_cast<virtio::VirtqAvail*>(w.guest + kAvailGpa);
  for (std::uint16_t i = 0; i < requests; ++i) {
    const std::uint8_t h = in.u8();
    avail->ring[i] = h < 0xf8 ? h % qsize : h;
  }
  avail->idx = requests;
  // With EVENT_IDX, ask for a call once the last request is answered (as a driver would).
  *virtq::used_event_word(avail, qsize) = static_cast<std::uint16_t>(requests - 1);
  const std::size_t data_bytes = std::min(in.n, kGuestBytes - kData);
  std::memcpy(w.guest + kData, in.p, data_bytes);
  const bool aliased = may_alias_rings(w, qsize);

  blk::BlkDevice& blk = *w.devs[read_only ? 1 : 0][uring ? 1 : 0];
  std::uint64_t features = bit(virtio::feature::version_1) | bit(bf::seg_max) | bit(bf::blk_size) |
                           bit(bf::flush) | bit(bf::size_max);
  if (mode & 16) features |= bit(bf::discard) | bit(bf::write_zeroes);
  if (mode & 32) features |= bit(virtio::feature::ring_indirect_desc);
  if (mode & 64) features |= bit(virtio::feature::ring_event_idx);
  if (read_only) features |= bit(bf::ro);
  features &= blk.features();

  {
    vhost::DeviceOptions o;
    o.name = "blk-fuzz";
    vhost::Device dev(blk, o);
    if (!dev.set_owner() || !dev.set_features(features)) finding("bring-up refused");
    std::vector<memory::RegionFd> table;
    table.push_back({memory::RegionSpec{0, kGuestBytes, w.uva(0), 0},
                     UniqueFd(::fcntl(w.memfd, F_DUPFD_CLOEXEC, 0))});
    if (!dev.set_mem_table(std::move(table))) finding("memory table refused");
    memory::VringAddr a;
    a.desc_user_addr = w.uva(kDescGpa);
    a.avail_user_addr = w.uva(kAvailGpa);
    a.used_user_addr = w.uva(kUsedGpa);
    UniqueFd kick(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    UniqueFd call(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    UniqueFd err(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!dev.set_vring_num(0, qsize) || !dev.set_vring_base(0, 0) || !dev.set_vring_addr(0, a) ||
        !dev.set_vring_call(0, UniqueFd(::fcntl(call.get(), F_DUPFD_CLOEXEC, 0))) ||
        !dev.set_vring_err(0, UniqueFd(::fcntl(err.get(), F_DUPFD_CLOEXEC, 0))) ||
        !dev.set_vring_enable(0, true) ||
        !dev.set_vring_kick(0, UniqueFd(::fcntl(kick.get(), F_DUPFD_CLOEXEC, 0)))) {
      finding("ring setup refused");
    }
    const std::uint64_t one = 1;
    if (::write(kick.get(), &one, sizeof one) != sizeof one) finding("kick");

    // Every request answered, or the ring broken: nothing may hang. Waits on the device's
    // signals, so a normal input costs only the time its requests take.
    const auto start = std::chrono::steady_clock::now();
    if (aliased) {
      // used->idx may be the guest's own scribble: wait until the device took every request;
      // stopping the ring below waits for the ones in flight.
      while (!all_taken(dev, requests) &&
             std::chrono::steady_clock::now() - start < kAliasedDeadline) {
        wait_signal(call.get(), err.get());
      }
    } else {
      while (used_idx(w) != requests && !dev.queue(0).broken()) {
        if (std::chrono::steady_clock::now() - start > kHangDeadline) {
          finding("requests neither answered nor the ring broken within 30 s");
        }
        wait_signal(call.get(), err.get());
      }
    }
    // Stopping the ring waits for anything still in flight (a broken ring's submitted requests).
    (void)dev.get_vring_base(0);
  }

  const auto* used = reinterpret_cast<const virtio::VirtqUsed*>(w.guest + kUsedGpa);
  const std::uint16_t answered = used->idx;
  if (w.verbose) {
    // BLK_FUZZ_VERBOSE=1 (e.g. when running one input by hand): what the device made of it.
    const blk::BlkStats st = blk.stats(0);
    std::fprintf(
        stderr,
        "blk_request_fuzz: %s %s, %u of %u answered; totals: reads %llu writes %llu "
        "flushes %llu discards %llu get_ids %llu bad %llu no_status %llu ioerr %llu\n",
        uring ? "uring" : "inline", read_only ? "ro" : "rw", answered, requests,
        static_cast<unsigned long long>(st.reads), static_cast<unsigned long long>(st.writes),
        static_cast<unsigned long long>(st.flushes), static_cast<unsigned long long>(st.discards),
        static_cast<unsigned long long>(st.get_ids),
        static_cast<unsigned long long>(st.bad_requests),
        static_cast<unsigned long long>(st.no_status),
        static_cast<unsigned long long>(st.io_errors));
  }
  if (!aliased) {
    if (answered > requests) finding("more used elements than requests");
    for (std::uint16_t i = 0; i < answered; ++i) {
      if (used->ring[i].id >= qsize) finding("a used element names a head outside the ring");
    }
  }
  if (w.image_size() != kImageBytes) finding("the image changed size");
  if (read_only && !w.image_is_pristine()) finding("a read-only image was written");
  if (!read_only) w.restore();
  if (vhostkit::testing::vhostkit_fd_count() != fds_before)
    finding("fd count changed across one input");
  return 0;
}

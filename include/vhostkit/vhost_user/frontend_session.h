// The protocol side of a vhost-user front-end (what a virtio driver such as DPDK's virtio-user
// talks through): connects to any vhost-user back-end, negotiates features and protocol
// features, shares one memfd as "guest" memory, sets up the rings with kick/call eventfds,
// stops them with GET_VRING_BASE and checks every reply. It knows no device: the drivers in
// driver/ (NetDriver, BlkDriver) say which features they want and can drive, how many rings
// they need and how much memory each ring's buffers take, and run the data path on the rings.
//
// Memory: one memfd region mapped MAP_SHARED at guest-physical address 0, so a GPA is an offset
// into our mapping. Rings come first (one page-aligned block per ring, big enough for either
// layout), then one page-aligned area of FrontendOptions::ring_area_bytes per ring for that
// ring's driver to lay its buffers out in (FrontendRing::area).
//
// Ring layout: split (DriverQueue) unless VIRTIO_F_RING_PACKED was wanted, drivable and offered,
// then packed (PackedDriverQueue) on every ring; VIRTIO_F_IN_ORDER likewise applies to whichever
// layout runs. A driver asks for them through FrontendOptions::features and sees what it got
// from layout() and in_order(): a back-end that does not offer one gets the split ring, or
// chains returned in any order.
//
// Setting up takes two calls, so that a driver can put buffers on a ring before the back-end
// sees it (a receive ring starts full): connect() negotiates, shares the memory and lays out
// every ring; start_rings() hands the rings to the back-end (SET_VRING_NUM, BASE, ADDR, CALL,
// KICK, then SET_VRING_ENABLE).
//
// Everything the back-end sends is hostile: each reply is decoded by the codec (request number,
// REPLY flag, exact size, no fds) and then checked against what we asked (GET_VRING_BASE for the
// ring we named, queue counts in range). A failed step returns an Error naming the request; a
// back-end that does not answer costs at most FrontendOptions::timeout per step.
//
// Threading: one thread drives the control path. The data path of different rings may run on
// different threads; one ring is used by one thread at a time.
#pragma once

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/protocol.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost_user {

// Protocol features we use when the back-end offers them.
inline constexpr std::uint64_t kFrontendProtocolFeatures =
    (std::uint64_t{1} << protocol_feature::mq) | (std::uint64_t{1} << protocol_feature::reply_ack) |
    (std::uint64_t{1} << protocol_feature::config);

struct FrontendOptions {
  enum class Notify : std::uint8_t {
    event,  // kick and call eventfds: each side sleeps until the other signals
    poll,   // "no fd" for kick and call: the back-end polls the avail ring, we poll used
  };

  // Where to connect, unless `channel` is already connected (tests, or a front-end that listens
  // and lets the back-end connect as a client).
  std::string socket_path;
  Channel channel;

  std::uint16_t rings = 1;              // 1..FrontendSession::kMaxRings
  std::uint16_t queue_size = 256;       // power of two, 2..32768
  std::size_t ring_area_bytes = 0;      // the driver's memory per ring (its buffers)
  std::size_t memory_size = 64u << 20;  // the shared region; 0: just what rings and areas need
  // Device feature bits: acked = features & offered & drivable (PROTOCOL_FEATURES is the
  // session's own: acked whenever offered).
  std::uint64_t features = 0;  // what the driver wants
  std::uint64_t drivable = 0;  // what the driver knows how to drive; nothing else is ever acked
  // More than one queue needs the device's MQ feature bit (named in errors), the MQ protocol
  // feature, and a GET_QUEUE_NUM of at least `count`, counted in `unit` (net counts pairs).
  struct Queues {
    std::uint16_t count = 1;
    unsigned mq_feature = 0;
    std::string mq_name;
    std::string unit = "queues";
  } queues;
  std::uint64_t protocol_features = kFrontendProtocolFeatures;
  Notify notify = Notify::event;
  // Bound on each control-path step (send, or wait for a reply).
  std::chrono::milliseconds timeout{2000};
  std::string name = "frontend";  // in log lines

  // Checks everything above that does not need the back-end. connect() calls it.
  Result<> validate() const;
  // Bytes of memory the rings and their areas need.
  std::size_t layout_bytes() const noexcept;
};

// The two ring layouts, as options and reports name them.
enum class RingLayout : std::uint8_t { split, packed };
constexpr std::string_view to_string(RingLayout l) noexcept {
  return l == RingLayout::packed ? "packed" : "split";
}

// One ring as the protocol side set it up. Public so a driver (and a benchmark) can run its
// data path on the queue of the negotiated layout: `vq` when split, `pvq` when packed (the
// other one is never initialised). A data path dispatches once per burst with visit(), which
// hands the queue to a generic callable: each layout gets its own instantiation, and the
// per-descriptor work has no branch on the layout and no indirect call.
struct FrontendRing {
  std::uint16_t index = 0;
  bool packed = false;
  virtq::DriverQueue vq;
  virtq::PackedDriverQueue pvq;
  UniqueFd kick;  // invalid in poll mode
  UniqueFd call;  // invalid in poll mode
  // This ring's driver area in the shared memory: host address, GPA, bytes.
  std::uint8_t* area = nullptr;
  std::uint64_t area_gpa = 0;
  std::size_t area_bytes = 0;
  // Written by the ring's data-path thread only.
  std::uint64_t kicks = 0;  // kick eventfd writes
  std::uint64_t calls = 0;  // call eventfd wake-ups consumed

  template <typename F>
  decltype(auto) visit(F&& f) noexcept {
    return packed ? f(pvq) : f(vq);
  }
  // The queue as its own type, for a data path already running on one layout (a pair's two
  // rings share it): ring<virtq::DriverQueue>() or ring<virtq::PackedDriverQueue>().
  template <typename Q>
  Q& ring() noexcept {
    if constexpr (std::is_same_v<Q, virtq::PackedDriverQueue>) {
      return pvq;
    } else {
      return vq;
    }
  }
  template <typename F>
  decltype(auto) visit(F&& f) const noexcept {
    return packed ? f(pvq) : f(vq);
  }
  // The same for the calls a control loop makes about once per burst.
  std::uint16_t size() const noexcept { return packed ? pvq.size() : vq.size(); }
  // Descriptors not on the ring.
  std::uint16_t free_count() const noexcept { return packed ? pvq.free_count() : vq.free_count(); }
  std::uint64_t bad_used() const noexcept { return packed ? pvq.bad_used() : vq.bad_used(); }
  bool needs_kick() noexcept { return packed ? pvq.needs_kick() : vq.needs_kick(); }
  void disable_interrupts() noexcept {
    if (packed) {
      pvq.disable_interrupts();
    } else {
      vq.disable_interrupts();
    }
  }
  bool enable_interrupts() noexcept {
    return packed ? pvq.enable_interrupts() : vq.enable_interrupts();
  }
};

class FrontendSession {
 public:
  static constexpr std::uint16_t kMaxRings = 256;

  // Connects (or takes opts.channel), negotiates, shares the memory and lays out every ring;
  // the back-end has not seen the rings yet (start_rings()). On failure everything acquired so
  // far is released and the error names the step that failed.
  static Result<std::unique_ptr<FrontendSession>> connect(FrontendOptions opts);

  ~FrontendSession();  // close()
  FrontendSession(const FrontendSession&) = delete;
  FrontendSession& operator=(const FrontendSession&) = delete;

  // ---- What was negotiated ----
  std::uint64_t offered_features() const noexcept { return offered_features_; }
  std::uint64_t features() const noexcept { return features_; }  // acked
  std::uint64_t offered_protocol_features() const noexcept { return offered_protocol_; }
  std::uint64_t protocol_features() const noexcept { return protocol_; }  // acked
  bool has_protocol(unsigned bit) const noexcept { return (protocol_ >> bit) & 1u; }
  // GET_QUEUE_NUM's answer (0 if MQ was not negotiated).
  std::uint64_t backend_queue_num() const noexcept { return backend_queue_num_; }
  std::uint16_t num_rings() const noexcept { return static_cast<std::uint16_t>(rings_.size()); }
  std::uint16_t queue_size() const noexcept { return opts_.queue_size; }
  // The layout every ring runs (VIRTIO_F_RING_PACKED acked) and whether IN_ORDER was acked.
  RingLayout layout() const noexcept {
    return virtio::has(features_, virtio::feature::ring_packed) ? RingLayout::packed
                                                                : RingLayout::split;
  }
  bool in_order() const noexcept { return virtio::has(features_, virtio::feature::in_order); }
  FrontendOptions::Notify notify() const noexcept { return opts_.notify; }
  std::span<std::uint8_t> memory() const noexcept { return {base_, mem_size_}; }
  int socket_fd() const noexcept { return channel_.fd(); }
  // True once the rings were stopped (or the session closed): the data path is over.
  bool stopped() const noexcept { return stopped_; }

  // ---- Control path ----
  // Hands every ring to the back-end: SET_VRING_NUM, BASE, ADDR, CALL, KICK per ring, then
  // SET_VRING_ENABLE for each when PROTOCOL_FEATURES was negotiated. Once only.
  Result<> start_rings();
  // GET_CONFIG (needs the CONFIG protocol feature).
  Result<std::vector<std::uint8_t>> get_config(std::uint32_t offset, std::uint32_t size);
  // GET_VRING_BASE on every ring (the back-end stops them); returns each ring's num: split, the
  // last_avail_idx (16 bits); packed, the 32-bit encoding of virtq::PackedRingBase (a back-end
  // may send the avail half only), both positions checked to lie on the ring.
  // After this the data path must not be used. Idempotent: a second call returns the same.
  Result<std::vector<std::uint32_t>> stop();
  // Stops the rings if they were started and the connection is still healthy, then closes the
  // socket, unmaps memory and closes every fd. Idempotent.
  void close() noexcept;

  // ---- Data path (noexcept, allocation-free) ----
  FrontendRing& ring(std::uint16_t i) noexcept { return rings_[i]; }
  const FrontendRing& ring(std::uint16_t i) const noexcept { return rings_[i]; }
  // Kicks ring i if the device asked for it (EVENT_IDX / NO_NOTIFY). True if kicked.
  bool kick_if_needed(std::uint16_t ring) noexcept;
  // Kicks unconditionally (no-op in poll mode).
  void kick(std::uint16_t ring) noexcept;
  // Event mode: re-enables call notifications on ring i and sleeps until the device calls or
  // `timeout` passes. Returns true if used entries are (probably) waiting. Poll mode: returns
  // at once whether used entries are waiting.
  bool wait_call(std::uint16_t ring, std::chrono::milliseconds timeout) noexcept;

 private:
  FrontendSession() = default;
  Result<> negotiate();
  Result<> setup_memory();
  Result<> layout_ring(std::uint16_t i);
  Result<> start_ring(std::uint16_t i);

  // Sends a request that has no reply body; with REPLY_ACK negotiated sets NEED_REPLY and
  // waits for the ack. `what` names the step in errors ("SET_VRING_NUM ring 3").
  template <typename T>
  Result<> request(T& msg, std::string_view what);
  Result<Received> recv_reply(std::string_view what);
  Result<std::uint64_t> query_u64(Request req);
  Error step_error(std::string_view what, const Error& e) const;

  FrontendOptions opts_;
  Channel channel_;
  UniqueFd memfd_;
  std::uint8_t* base_ = nullptr;
  std::size_t mem_size_ = 0;
  std::uint64_t offered_features_ = 0;
  std::uint64_t features_ = 0;
  std::uint64_t offered_protocol_ = 0;
  std::uint64_t protocol_ = 0;
  std::uint64_t backend_queue_num_ = 0;
  bool healthy_ = true;  // false after a control-path error: close() then skips GET_VRING_BASE
  bool started_ = false;
  bool stopped_ = false;
  std::vector<std::uint32_t> stopped_bases_;
  std::vector<FrontendRing> rings_;
};

// ---- Inline data path ----

inline void FrontendSession::kick(std::uint16_t i) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.kick.valid()) return;
  const std::uint64_t one = 1;
  // A full counter (EAGAIN) still leaves the eventfd readable: the kick is not lost.
  [[maybe_unused]] ssize_t n = ::write(r.kick.get(), &one, sizeof one);
  ++r.kicks;
}

inline bool FrontendSession::kick_if_needed(std::uint16_t i) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.kick.valid() || !r.needs_kick()) return false;
  kick(i);
  return true;
}

}  // namespace vhostkit::vhost_user

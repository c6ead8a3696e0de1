// A vhost-user front-end for the process-level hostile run: it can speak the protocol properly
// (to bring a device up to the point where a ring or table is attacked) and it can write any
// bytes, fds, descriptors and ring indices it likes. One RawPeer is one connection; every case
// gets a fresh one.
//
// Memory: one memfd of kMemSize mapped MAP_SHARED and offered as one region at guest-physical
// address kGpaBase. Ring i's block lives at kGpaBase + i * kRingStride; data buffers from
// kDataOffset on.
#pragma once

#include <sys/eventfd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/virtio/ring.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::hostile {

using vhost_user::Request;

// What the back-end did with one request.
enum class Answer : std::uint8_t { ack, nack, closed, silent };
const char* to_string(Answer a) noexcept;

class RawPeer {
 public:
  static constexpr std::size_t kMemSize = 4u << 20;
  static constexpr std::uint64_t kGpaBase = 0x100000;
  static constexpr std::size_t kRingStride = 64u << 10;
  static constexpr std::size_t kDataOffset = 1u << 20;
  static constexpr std::uint16_t kRingSize = 64;

  static Result<std::unique_ptr<RawPeer>> connect(const std::string& path);
  ~RawPeer();
  RawPeer(const RawPeer&) = delete;
  RawPeer& operator=(const RawPeer&) = delete;

  int sock() const noexcept { return ch_.fd(); }
  vhost_user::Channel& channel() noexcept { return ch_; }
  std::uint8_t* mem() const noexcept { return mem_; }
  std::uint64_t uva(std::size_t offset = 0) const noexcept {
    return reinterpret_cast<std::uint64_t>(mem_) + offset;
  }
  UniqueFd dup_memfd() const;
  // The whole memfd as one region.
  memory::RegionSpec region() const noexcept;
  std::uint64_t offered_features() const noexcept { return offered_; }
  std::uint64_t features() const noexcept { return features_; }
  bool reply_ack() const noexcept { return reply_ack_; }

  // Header, payload and fds exactly as given, in one sendmsg (no checks at all).
  bool send_raw(const vhost_user::Header& h, std::span<const std::uint8_t> payload,
                std::span<const int> fds = {});
  bool send_bytes(std::span<const std::uint8_t> bytes);
  // A raw request with NEED_REPLY, and what came back.
  Answer raw_request(Request r, std::span<const std::uint8_t> payload,
                     std::span<const int> fds = {});
  // A typed request with NEED_REPLY (REPLY_ACK must have been negotiated), and the answer.
  template <vhost_user::Encodable T>
  Answer ask(const T& m) {
    auto out = vhost_user::encode(m, vhost_user::kNeedReplyFlag);
    if (!out) return Answer::silent;
    if (!ch_.send(*out)) return Answer::closed;
    return read_ack(T::kRequest);
  }
  // A typed request that must succeed (acked 0 when REPLY_ACK is on).
  template <vhost_user::Encodable T>
  Result<> ok(const T& m) {
    if (!reply_ack_) {
      if (auto r = ch_.send_message(m); !r) return r;
      return {};
    }
    const Answer a = ask(m);
    if (a != Answer::ack) {
      return fail(Errc::broken,
                  std::string(vhost_user::to_string(T::kRequest)) + ": " + to_string(a));
    }
    return {};
  }
  Result<std::uint64_t> get_u64(Request r);
  Result<vhost_user::VringState> get_vring_base(std::uint32_t index);
  // The next reply to `r` as an ack; closed when the back-end hung up, silent when nothing came.
  Answer read_ack(Request r);
  // Did the back-end close the connection (within `wait`)?
  bool closed_within(std::chrono::milliseconds wait);

  // GET_FEATURES, protocol features (REPLY_ACK, MQ, CONFIG, CONFIGURE_MEM_SLOTS if offered),
  // SET_OWNER, SET_FEATURES (VERSION_1, INDIRECT_DESC, PROTOCOL_FEATURES; no event idx, so
  // every kick and call is unconditional).
  Result<> handshake();
  Result<> set_mem_table();
  // NUM/BASE/ADDR/ERR/CALL/KICK/ENABLE for ring i of kRingSize.
  Result<> setup_ring(std::uint32_t i);
  // handshake + table + rings 0..n-1.
  Result<> bring_up(std::uint32_t rings);

  // Ring i's shared parts (valid after setup_ring(i)).
  virtq::DriverQueue& queue(std::uint32_t i) { return *rings_.at(i).dq; }
  virtio::VirtqDesc* desc(std::uint32_t i) { return rings_.at(i).dq->desc(); }
  // Puts `head` in the next avail slot and publishes avail->idx += 1 (or `idx_step`).
  void post_head(std::uint32_t i, std::uint16_t head, std::uint16_t idx_step = 1);
  void kick(std::uint32_t i);
  // Waits for used->idx of ring i to pass `count`, or the ring's err eventfd to fire.
  enum class RingEvent : std::uint8_t { used, error, nothing };
  RingEvent wait_ring(std::uint32_t i, std::uint16_t count, std::chrono::milliseconds wait);
  std::uint16_t used_idx(std::uint32_t i);
  virtio::VirtqUsedElem used_elem(std::uint32_t i, std::uint16_t slot);
  std::uint64_t gpa(std::size_t offset) const noexcept { return kGpaBase + offset; }

 private:
  RawPeer() = default;
  struct Ring {
    std::unique_ptr<virtq::DriverQueue> dq;
    UniqueFd kick, call, err;
    std::uint16_t avail_idx = 0;
  };
  vhost_user::Channel ch_;
  UniqueFd memfd_;
  std::uint8_t* mem_ = nullptr;
  std::uint64_t offered_ = 0;
  std::uint64_t features_ = 0;
  bool reply_ack_ = false;
  std::vector<Ring> rings_;
};

inline UniqueFd make_eventfd() { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

template <typename T>
std::span<const std::uint8_t> bytes_of(const T& v) {
  return {reinterpret_cast<const std::uint8_t*>(&v), sizeof(T)};
}

}  // namespace vhostkit::hostile

// The hostile cases of the process-level run: each is one connection's worth of bad input.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "raw_peer.h"

namespace vhostkit::hostile {

enum class Target : std::uint8_t { net, blk };
const char* to_string(Target t) noexcept;

// How many rings the back-end under test has (vhostkit-net --queues=1: rx 0 + tx 1; blk: 1),
// and which ring the ring cases attack (net: the transmitq, which the device reads from).
inline std::uint32_t rings_of(Target t) { return t == Target::net ? 2 : 1; }
inline std::uint32_t attacked_ring(Target t) { return t == Target::net ? 1 : 0; }
// The device's queue count, the first out-of-range index: net also has its control queue (2p+1).
inline std::uint32_t queues_of(Target t) { return t == Target::net ? 3 : 1; }

struct Case {
  std::string klass;  // the class: framing, index, ring size, fds, table, order, ring...
  std::string name;
  bool net = true;
  bool blk = true;
  // Runs the case on a fresh connection. The string says what the back-end did ("refused",
  // "closed", "used len 0", "ring broken"); an Error means the back-end did something a
  // correct one must not (accepted a bad request, answered a bad chain with data).
  std::function<Result<std::string>(RawPeer&, Target)> run;
};

std::vector<Case> message_cases();
std::vector<Case> ring_cases();

}  // namespace vhostkit::hostile

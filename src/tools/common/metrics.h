// Prometheus metrics for the back-end programs (--metrics): a snapshot of every counter and
// gauge, built from the devices by relaxed loads only (the data path takes no lock for it), and
// rendered as the Prometheus text exposition format 0.0.4 (/metrics) or as JSON (/stats).
//
// Names: vhostkit_<device>_<what>[_total]. The label `queue` is always the virtqueue index as
// the spec numbers them (net: 2p is pair p's receiveq, 2p+1 its transmitq, 2P the control
// queue; blk: the request queue), so rx counters sit on even queues, tx counters on odd ones.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "vhostkit/vhost/device.h"

namespace vhostkit::blk {
class BlkDevice;
}
namespace vhostkit::net {
class NetDevice;
}

namespace vhostkit::cli::metrics {

enum class Kind : std::uint8_t { counter, gauge };

struct Sample {
  std::vector<std::pair<std::string, std::string>> labels;  // rendered in this order
  std::uint64_t value = 0;
};

// One metric family: a name (with _total for a counter), its HELP text and its samples.
struct Family {
  std::string name;
  std::string help;
  Kind kind = Kind::gauge;
  std::vector<Sample> samples;
};

class Snapshot {
 public:
  // The family `name`, made on first use (Prometheus wants a family's samples together, and a
  // device adds them queue by queue).
  Family& family(std::string_view name, std::string_view help, Kind kind);
  void add(std::string_view name, std::string_view help, Kind kind, Sample s) {
    family(name, help, kind).samples.push_back(std::move(s));
  }
  const std::vector<Family>& families() const noexcept { return families_; }

 private:
  std::vector<Family> families_;
};

// What the program knows about its front-end (BackendProgram keeps it).
struct Connection {
  bool connected = false;
  std::uint64_t sessions = 0;
};

// Text exposition format 0.0.4: per family "# HELP", "# TYPE", then one line per sample.
// HELP escapes '\' and newline; label values escape '\', '"' and newline.
std::string to_prometheus(const Snapshot& s);
// {"<name>": {"type": "counter", "help": "...", "samples": [{"labels": {...}, "value": N}]}}
nlohmann::json to_json(const Snapshot& s);

// What every vhost device has: the connection, the acked features (one 0/1 sample per offered
// bit), each ring's size, started and broken state, and its ring counters (kicks, calls,
// chains, bytes, bad chains). `device` is the name part: "net", "blk".
void add_device(Snapshot& s, std::string_view device, vhost::Device& dev, const Connection& c);
// virtio-net's per-pair counters (frames, bytes, drops, errors each way) and control state.
void add_net(Snapshot& s, const net::NetDevice& dev);
// virtio-blk's per-queue request counters.
void add_blk(Snapshot& s, const blk::BlkDevice& dev);

}  // namespace vhostkit::cli::metrics

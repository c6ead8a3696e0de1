// Parsing helpers shared by vhostkit's programs: CPU lists, MAC addresses, log levels, and the
// signal fd that turns SIGINT/SIGTERM into a readable fd the servers can stop on.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::cli {

// "0", "0,2", "1-3,6": CPUs in the order given, each at most once, each < CPU_SETSIZE.
Result<std::vector<int>> parse_cpu_list(std::string_view s);

// "52:54:00:12:34:56" (or with '-'): a unicast address.
Result<std::array<std::uint8_t, 6>> parse_mac(std::string_view s);
std::string format_mac(const std::array<std::uint8_t, 6>& mac);

// trace, debug, info, warn, error, critical, off: sets spdlog's default level.
Result<> set_log_level(std::string_view level);

// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread started after it)
// and returns a signalfd that becomes readable when either arrives. Call before any thread
// starts.
Result<UniqueFd> block_stop_signals();

}  // namespace vhostkit::cli

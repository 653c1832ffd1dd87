// Launch geometry of the deterministic per-channel reductions (channel_clip's
// and soft_histogram's backward): a block holds threads / lanes channels,
// each with a power-of-two number of lanes (up to the inner size); rows are
// cut into slabs on grid.y so about 1024 blocks run, and a second kernel sums
// the slabs' partials in a fixed order.
#pragma once
#include <cstdint>

namespace pydefend::cuda {

struct ChannelGrid {
  int lanes;
  int64_t channel_blocks, slabs, rows_per_slab;
};

inline ChannelGrid channel_grid(int64_t outer, int64_t channels, int64_t inner, int threads) {
  ChannelGrid g;
  g.lanes = 1;
  while (g.lanes < inner && g.lanes < threads) g.lanes *= 2;
  const int64_t channels_per_block = threads / g.lanes;
  g.channel_blocks = (channels + channels_per_block - 1) / channels_per_block;
  int64_t slabs = 1024 / g.channel_blocks;
  slabs = slabs < 1 ? 1 : (slabs > outer ? outer : slabs);
  g.rows_per_slab = (outer + slabs - 1) / slabs;
  g.slabs = (outer + g.rows_per_slab - 1) / g.rows_per_slab;  // no empty trailing slab
  return g;
}

}  // namespace pydefend::cuda

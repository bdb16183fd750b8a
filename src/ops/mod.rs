//! One safe wrapper per kernel: check shapes, compute the launch config, launch. No allocation.

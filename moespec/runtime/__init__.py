"""What training code uses: built MoE layer modules."""

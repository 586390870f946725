"""A small humanoid that follows the pose stream: kinematics -> safety -> servo bus."""

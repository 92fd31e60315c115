"""RL maths and machinery: KL estimators and controllers, rewards per token, GAE,
group-relative advantages, PPO/DPO/IPO losses, reward sources, rollouts,
the reference policy and the seed-compatible `ActorCritic`.

Everything (b, T) is over response tokens with a bool mask, 0 on padding.
"""

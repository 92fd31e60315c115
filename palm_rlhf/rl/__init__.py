"""RL maths and machinery: KL estimators and controllers, rewards per token, GAE,
group-relative advantages, RLOO and REINFORCE++ advantages, PPO/DPO/IPO losses, reward
sources, rollouts, the reference policy and the seed-compatible `ActorCritic`.

Everything (b, T) is over response tokens with a bool mask, 0 on padding. The losses take
log-probs, entropies, values and masks; the model forward that produces them is
`palm_rlhf.generation.scoring.Scorer`.
"""

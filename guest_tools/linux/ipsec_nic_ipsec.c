// SPDX-License-Identifier: GPL-2.0
/*
 * ipsec-nic: xfrmdev_ops, Linux IPsec crypto and packet offload on the card.
 *
 * Crypto offload (NETIF_F_HW_ESP): the stack builds ESP (header, IV room,
 * padding, trailer, ICV room) and the card encrypts it and writes the ICV
 * (datasheet 7.3). On receive the card decrypts in place and reports
 * CryptoDone/CryptoStatus; we hand that to xfrm as the skb's sec_path and
 * xfrm_offload() status, so the stack skips its crypto but still checks replay.
 *
 * Packet offload: the card numbers, pads, encapsulates and checks replay
 * (ADD_SA_PACKET, datasheet 7.4/7.6). The stack hands us plain packets with no
 * sec_path; we pick the SA from our copy of the offloaded policies.
 *
 * Card commands: xdo_dev_state_add -> V2_ADD_SA_EX (crypto) or ADD_SA_PACKET,
 * xdo_dev_state_free -> V2_DELETE_SA, xdo_dev_state_advance_esn -> V2_UPDATE_SA,
 * xdo_dev_state_update_stats <- GET_SA_STATS (cached by a work item).
 */
#include <linux/debugfs.h>
#include <linux/etherdevice.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <crypto/aead.h>
#include <net/arp.h>
#include <net/esp.h>
#include <net/ipv6.h>
#include <net/ndisc.h>

#include "ipsec_nic.h"

struct ipnc_policy {
	struct list_head node;		/* adapter->policies, RCU */
	struct rcu_head rcu;
	struct xfrm_policy *xp;
	struct xfrm_selector sel;
	u32 priority;			/* lower wins, as in the kernel's SPD */
	u32 reqid;
	xfrm_address_t tmpl_daddr;
	u16 family;
	bool bypass;			/* no template: the packet goes out plain */
};

/* Algorithms: what Linux names and the card's NDIS identifiers. */
struct ipnc_algs {
	u32 enc_id;
	u32 enc_keylen;
	const u8 *enc_key;
	u32 auth_id;
	u32 auth_keylen;
	const u8 *auth_key;
	u32 additional_info;
	u8 icv_len;
};

static int ipnc_gcm_id(u32 keybits, u32 *enc, u32 *gmac)
{
	/* rfc4106/rfc4543 keys carry the 32-bit salt last (RFC 4106 8.1). */
	switch (keybits) {
	case 128 + 32:
		*enc = IPNC_ENC_ALG_AES_GCM_128;
		*gmac = IPNC_AUTH_ALG_AES_GMAC_128;
		return 0;
	case 192 + 32:
		*enc = IPNC_ENC_ALG_AES_GCM_192;
		*gmac = IPNC_AUTH_ALG_AES_GMAC_192;
		return 0;
	case 256 + 32:
		*enc = IPNC_ENC_ALG_AES_GCM_256;
		*gmac = IPNC_AUTH_ALG_AES_GMAC_256;
		return 0;
	}
	return -EINVAL;
}

static int ipnc_parse_algs(struct ipnc_adapter *a, struct xfrm_state *x, struct ipnc_algs *p,
			   struct netlink_ext_ack *extack)
{
	u32 enc, gmac;

	memset(p, 0, sizeof(*p));
	if (x->aead) {
		const char *name = x->aead->alg_name;
		u32 icv = x->aead->alg_icv_len;

		if (ipnc_gcm_id(x->aead->alg_key_len, &enc, &gmac)) {
			NL_SET_ERR_MSG_MOD(extack,
					   "AES-GCM/GMAC key must be 128, 192 or 256 bits plus a 32-bit salt");
			return -EINVAL;
		}
		if (!strcmp(name, "rfc4106(gcm(aes))")) {
			if (icv != 64 && icv != 96 && icv != 128) {
				NL_SET_ERR_MSG_MOD(extack,
						   "AES-GCM ICV must be 64, 96 or 128 bits");
				return -EINVAL;
			}
			if (!(a->enc_algos & enc)) {
				NL_SET_ERR_MSG_MOD(extack,
						   "card does not offer this AES-GCM key size");
				return -EINVAL;
			}
			p->enc_id = enc;
			p->enc_keylen = x->aead->alg_key_len / 8;
			p->enc_key = x->aead->alg_key;
			p->additional_info = icv / 8;
			p->icv_len = icv / 8;
			return 0;
		}
		if (!strcmp(name, "rfc4543(gcm(aes))")) {
			if (icv != 128) {
				NL_SET_ERR_MSG_MOD(extack,
						   "AES-GMAC ICV must be 128 bits (RFC 4543)");
				return -EINVAL;
			}
			if (!(a->auth_algos & gmac) || !(a->enc_algos & IPNC_ENC_ALG_NONE)) {
				NL_SET_ERR_MSG_MOD(extack,
						   "card does not offer this AES-GMAC key size");
				return -EINVAL;
			}
			p->enc_id = IPNC_ENC_ALG_NONE;
			p->auth_id = gmac;
			p->auth_keylen = x->aead->alg_key_len / 8;
			p->auth_key = x->aead->alg_key;
			p->icv_len = 16;
			return 0;
		}
		NL_SET_ERR_MSG_MOD(extack,
				   "AEAD not offloadable: use rfc4106(gcm(aes)) or rfc4543(gcm(aes))");
		return -EINVAL;
	}
	if (!x->ealg) {
		NL_SET_ERR_MSG_MOD(extack, "ESP without encryption algorithm cannot be offloaded");
		return -EINVAL;
	}
	if (!x->aalg) {
		/* NDIS: an IPsec packet must always be authenticated */
		NL_SET_ERR_MSG_MOD(extack, "ESP without integrity cannot be offloaded");
		return -EINVAL;
	}
	if (!strcmp(x->ealg->alg_name, "cbc(aes)")) {
		switch (x->ealg->alg_key_len) {
		case 128:
			p->enc_id = IPNC_ENC_ALG_AES_CBC_128;
			break;
		case 192:
			p->enc_id = IPNC_ENC_ALG_AES_CBC_192;
			break;
		case 256:
			p->enc_id = IPNC_ENC_ALG_AES_CBC_256;
			break;
		default:
			NL_SET_ERR_MSG_MOD(extack, "AES-CBC key must be 128, 192 or 256 bits");
			return -EINVAL;
		}
	} else if (!strcmp(x->ealg->alg_name, "cbc(des3_ede)") && x->ealg->alg_key_len == 192) {
		p->enc_id = IPNC_ENC_ALG_TDES_CBC;
	} else if (!strcmp(x->ealg->alg_name, "ecb(cipher_null)")) {
		p->enc_id = IPNC_ENC_ALG_NONE;
	} else {
		NL_SET_ERR_MSG_MOD(extack, "encryption not offloadable: use cbc(aes), or an AEAD");
		return -EINVAL;
	}
	if (!(a->enc_algos & p->enc_id)) {
		NL_SET_ERR_MSG_MOD(extack, "card does not offer this encryption algorithm");
		return -EINVAL;
	}
	p->enc_keylen = x->ealg->alg_key_len / 8;
	p->enc_key = x->ealg->alg_key;

	if (!strcmp(x->aalg->alg_name, "hmac(sha1)") && x->aalg->alg_key_len == 160 &&
	    x->aalg->alg_trunc_len == 96) {
		p->auth_id = IPNC_AUTH_ALG_SHA1;
	} else if (!strcmp(x->aalg->alg_name, "hmac(sha256)") && x->aalg->alg_key_len == 256 &&
		   x->aalg->alg_trunc_len == 128) {
		p->auth_id = IPNC_AUTH_ALG_SHA256;	/* RFC 4868 */
	} else if (!strcmp(x->aalg->alg_name, "hmac(md5)") && x->aalg->alg_key_len == 128 &&
		   x->aalg->alg_trunc_len == 96) {
		p->auth_id = IPNC_AUTH_ALG_MD5;
	} else {
		NL_SET_ERR_MSG_MOD(extack,
				   "integrity not offloadable: use hmac(sha1) 160-bit key/96, hmac(sha256) 256-bit key/128");
		return -EINVAL;
	}
	if (!(a->auth_algos & p->auth_id)) {
		NL_SET_ERR_MSG_MOD(extack, "card does not offer this integrity algorithm");
		return -EINVAL;
	}
	p->auth_keylen = x->aalg->alg_key_len / 8;
	p->auth_key = x->aalg->alg_key;
	p->icv_len = x->aalg->alg_trunc_len / 8;
	return 0;
}

static void ipnc_addr(u8 *dst, const xfrm_address_t *addr, u16 family)
{
	memset(dst, 0, 16);
	if (family == AF_INET6)
		memcpy(dst, addr->a6, 16);
	else
		memcpy(dst, &addr->a4, 4);
}

/* The firmware's NDIS status, as an extack message (literals only). */
static int ipnc_fw_refusal(u32 fw_status, struct netlink_ext_ack *extack)
{
	switch (fw_status) {
	case IPNC_NDIS_STATUS_RESOURCES:
		NL_SET_ERR_MSG_MOD(extack, "card SA table is full");
		return -ENOSPC;
	case IPNC_NDIS_STATUS_NOT_SUPPORTED:
		NL_SET_ERR_MSG_MOD(extack, "card does not support these SA parameters");
		return -EINVAL;
	case IPNC_NDIS_STATUS_INVALID_PARAMETER:
		NL_SET_ERR_MSG_MOD(extack,
				   "card refused the SA (duplicate SPI, bad address or parameter)");
		return -EINVAL;
	default:
		NL_SET_ERR_MSG_MOD(extack, "card refused the SA");
		return -EINVAL;
	}
}

static u64 ipnc_limit(u64 v)
{
	return v == XFRM_INF ? 0 : v;
}

/* Build V2_ADD_SA_EX or ADD_SA_PACKET (same leading layout), followed by the keys. */
static int ipnc_build_add(struct ipnc_adapter *a, struct xfrm_state *x, const struct ipnc_algs *p,
			  bool packet, u8 **out, u32 *out_len)
{
	u32 fixed = packet ? sizeof(struct ipnc_add_sa_packet) : sizeof(struct ipnc_v2_add_sa_ex);
	u32 keys = p->enc_keylen + p->auth_keylen;
	struct ipnc_v2_add_sa_ex *ex;
	struct ipnc_sa_v2 *sa;
	u16 family = x->props.family;
	u32 flags;
	u8 *buf;

	buf = kzalloc(fixed + keys, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	/* ADD_SA_PACKET starts with the V2_ADD_SA_EX fields (firmware_model/ndis.py) */
	BUILD_BUG_ON(offsetof(struct ipnc_add_sa_packet, reserved) !=
		     offsetof(struct ipnc_v2_add_sa_ex, reserved));
	ex = (struct ipnc_v2_add_sa_ex *)buf;
	ex->header_type = IPNC_NDIS_OBJECT_TYPE_DEFAULT;
	ex->header_revision = IPNC_NDIS_REVISION_1;
	ex->header_size = cpu_to_le16(fixed);
	ex->num_ext_hdrs = cpu_to_le32(1);
	flags = x->xso.dir == XFRM_DEV_OFFLOAD_IN ? IPNC_V2_ADD_FLAGS_INBOUND : 0;
	if (family == AF_INET6)
		flags |= IPNC_V2_ADD_FLAGS_IPV6;
	ex->flags = cpu_to_le32(flags);
	ipnc_addr(ex->src_addr, &x->props.saddr, family);
	ipnc_addr(ex->dest_addr, &x->id.daddr, family);
	sa = &ex->sec_assoc[0];
	sa->operation = cpu_to_le32(IPNC_V2_OPERATION_ESP);
	sa->spi = cpu_to_le32(ntohl(x->id.spi));
	sa->encryption_algorithm.identifier = cpu_to_le32(p->enc_id);
	sa->encryption_algorithm.key_length = cpu_to_le32(p->enc_keylen);
	sa->encryption_algorithm.key_offset_bytes = 0;
	sa->encryption_algorithm.additional_info = cpu_to_le32(p->additional_info);
	sa->authentication_algorithm.identifier = cpu_to_le32(p->auth_id);
	sa->authentication_algorithm.key_length = cpu_to_le32(p->auth_keylen);
	sa->authentication_algorithm.key_offset_bytes = cpu_to_le32(p->enc_keylen);
	if (x->props.flags & XFRM_STATE_ESN) {
		sa->flags = cpu_to_le32(IPNC_V2_SA_FLAGS_ESN_SA);
		sa->sequence_number_high_order =
			cpu_to_le32(x->xso.dir == XFRM_DEV_OFFLOAD_IN ? x->replay_esn->seq_hi :
				    x->replay_esn->oseq_hi);
	}
	ex->key_length = cpu_to_le32(keys);
	ex->key_offset = cpu_to_le32(fixed);
	if (p->enc_keylen)
		memcpy(buf + fixed, p->enc_key, p->enc_keylen);
	if (p->auth_keylen)
		memcpy(buf + fixed + p->enc_keylen, p->auth_key, p->auth_keylen);

	if (packet) {
		struct ipnc_add_sa_packet *pk = (struct ipnc_add_sa_packet *)buf;
		const struct xfrm_selector *sel = &x->sel;
		const struct xfrm_replay_state_esn *esn = x->replay_esn;
		u64 seq;

		pk->mode = cpu_to_le32(x->props.mode == XFRM_MODE_TUNNEL ? IPNC_MODE_TUNNEL :
				       IPNC_MODE_TRANSPORT);
		if (x->encap) {
			pk->udp_esp_encapsulation =
				cpu_to_le32(x->props.mode == XFRM_MODE_TUNNEL ?
					    IPNC_UDP_ESP_ENCAPSULATION_TUNNEL :
					    IPNC_UDP_ESP_ENCAPSULATION_TRANSPORT);
			pk->encap_sport = cpu_to_le16(ntohs(x->encap->encap_sport));
			pk->encap_dport = cpu_to_le16(ntohs(x->encap->encap_dport));
		}
		if (x->xso.dir == XFRM_DEV_OFFLOAD_IN) {
			u32 window = esn ? esn->replay_window : x->props.replay_window;

			pk->replay_window = cpu_to_le32(min(window, a->max_replay_window));
			seq = esn ? ((u64)esn->seq_hi << 32) | esn->seq : x->replay.seq;
		} else {
			seq = esn ? ((u64)esn->oseq_hi << 32) | esn->oseq : x->replay.oseq;
		}
		pk->initial_seq = cpu_to_le64(seq);
		pk->soft_packets = cpu_to_le64(ipnc_limit(x->lft.soft_packet_limit));
		pk->hard_packets = cpu_to_le64(ipnc_limit(x->lft.hard_packet_limit));
		pk->soft_bytes = cpu_to_le64(ipnc_limit(x->lft.soft_byte_limit));
		pk->hard_bytes = cpu_to_le64(ipnc_limit(x->lft.hard_byte_limit));
		if (sel->family && (sel->prefixlen_s || sel->prefixlen_d || sel->proto)) {
			ipnc_addr(pk->sel_src, &sel->saddr, sel->family);
			ipnc_addr(pk->sel_dst, &sel->daddr, sel->family);
			pk->sel_src_prefix = sel->prefixlen_s;
			pk->sel_dst_prefix = sel->prefixlen_d;
			pk->sel_proto = sel->proto;
			pk->sel_flags = IPNC_SEL_PRESENT;
			if (sel->family == AF_INET6)
				pk->sel_flags |= IPNC_SEL_IPV6;
			pk->sel_sport = cpu_to_le16(ntohs(sel->sport & sel->sport_mask));
			pk->sel_dport = cpu_to_le16(ntohs(sel->dport & sel->dport_mask));
		}
	}
	*out = buf;
	*out_len = fixed + keys;
	return 0;
}

static int ipnc_state_add(struct xfrm_state *x, struct netlink_ext_ack *extack)
{
	struct net_device *nd = x->xso.dev;
	struct ipnc_adapter *a = netdev_priv(nd);
	bool packet = x->xso.type == XFRM_DEV_OFFLOAD_PACKET;
	struct ipnc_handle_response resp;
	struct ipnc_algs algs;
	struct ipnc_sa *sa;
	u32 req_len, resp_len = sizeof(resp);
	u8 *req;
	int err;

	if (x->id.proto != IPPROTO_ESP) {
		NL_SET_ERR_MSG_MOD(extack, "only ESP SAs can be offloaded");
		return -EINVAL;
	}
	if (ntohl(x->id.spi) < 256) {
		/* RFC 4303 2.1: SPIs 1..255 are reserved; the card refuses them */
		NL_SET_ERR_MSG_MOD(extack,
				   "SPI 1..255 is reserved (RFC 4303 2.1): the card refuses it");
		return -EINVAL;
	}
	if (x->props.family != AF_INET && x->props.family != AF_INET6) {
		NL_SET_ERR_MSG_MOD(extack, "unsupported address family");
		return -EINVAL;
	}
	if (x->props.family == AF_INET6 && !(a->features & IPNC_FEATURES_IPV6)) {
		NL_SET_ERR_MSG_MOD(extack, "card has no IPv6 offload");
		return -EINVAL;
	}
	if (x->props.mode != XFRM_MODE_TRANSPORT && x->props.mode != XFRM_MODE_TUNNEL) {
		NL_SET_ERR_MSG_MOD(extack, "only transport and tunnel mode can be offloaded");
		return -EINVAL;
	}
	if (x->tfcpad) {
		NL_SET_ERR_MSG_MOD(extack, "TFC padding cannot be offloaded");
		return -EINVAL;
	}
	if ((x->props.flags & XFRM_STATE_ESN) && !(a->features & IPNC_FEATURES_ESN)) {
		NL_SET_ERR_MSG_MOD(extack, "card has no ESN support");
		return -EINVAL;
	}
	if (packet) {
		if (!(a->features & IPNC_FEATURES_PACKET_OFFLOAD)) {
			NL_SET_ERR_MSG_MOD(extack, "card has no packet offload");
			return -EINVAL;
		}
		if (x->encap && (x->encap->encap_type != UDP_ENCAP_ESPINUDP ||
				 !(a->features & IPNC_FEATURES_UDP_ESP))) {
			NL_SET_ERR_MSG_MOD(extack,
					   "only RFC 3948 UDP encapsulation can be offloaded");
			return -EINVAL;
		}
	} else if (x->encap) {
		NL_SET_ERR_MSG_MOD(extack, "UDP encapsulation needs packet offload");
		return -EINVAL;
	}
	err = ipnc_parse_algs(a, x, &algs, extack);
	if (err)
		return err;
	err = ipnc_build_add(a, x, &algs, packet, &req, &req_len);
	if (err)
		return err;
	err = ipnc_admin_cmd(a, packet ? IPNC_OPCODE_ADD_SA_PACKET : IPNC_OPCODE_V2_ADD_SA_EX,
			     req, req_len, &resp, &resp_len);
	kfree_sensitive(req);
	if (err == -EREMOTEIO)
		return ipnc_fw_refusal(a->aq_last_fw_status, extack);
	if (err) {
		NL_SET_ERR_MSG_MOD(extack, "card admin command failed");
		return err;
	}
	if (resp_len != sizeof(resp) || !le32_to_cpu(resp.offload_handle)) {
		NL_SET_ERR_MSG_MOD(extack, "card returned no SA handle");
		return -EIO;
	}
	sa = kzalloc(sizeof(*sa), GFP_KERNEL);
	if (!sa) {
		u32 h = le32_to_cpu(resp.offload_handle);

		ipnc_delete_handles(a, &h, 1);
		return -ENOMEM;
	}
	sa->xs = x;
	sa->handle = le32_to_cpu(resp.offload_handle);
	sa->spi = ntohl(x->id.spi);
	sa->icv_len = algs.icv_len;
	sa->inbound = x->xso.dir == XFRM_DEV_OFFLOAD_IN;
	sa->packet = packet;
	sa->esn = x->props.flags & XFRM_STATE_ESN;
	if (sa->esn)
		sa->card_seq_hi = sa->inbound ? x->replay_esn->seq_hi : x->replay_esn->oseq_hi;
	sa->want_seq_hi = sa->card_seq_hi;
	/* Never 0: the card's handles have bit 31 set (datasheet 5.2). */
	x->xso.offload_handle = sa->handle;
	spin_lock_bh(&a->sa_lock);
	hash_add_rcu(a->sa_table, &sa->node, sa->handle);
	spin_unlock_bh(&a->sa_lock);
	mutex_lock(&a->sa_list_lock);
	list_add_tail(&sa->list, &a->sa_list);
	mutex_unlock(&a->sa_list_lock);
	if (packet)
		mod_delayed_work(system_wq, &a->stats_work, IPNC_STATS_INTERVAL);
	netdev_dbg(nd, "SA spi %#x %s %s offloaded, handle %#x\n", sa->spi,
		   sa->inbound ? "in" : "out", packet ? "packet" : "crypto", sa->handle);
	return 0;
}

static struct ipnc_sa *ipnc_sa_lookup(struct ipnc_adapter *a, u32 handle)
{
	struct ipnc_sa *sa;

	hash_for_each_possible_rcu(a->sa_table, sa, node, handle)
		if (sa->handle == handle)
			return sa;
	return NULL;
}

/* Called with x->lock held (atomic): only unlink; the card forgets it in free. */
static void ipnc_state_delete(struct xfrm_state *x)
{
	struct ipnc_adapter *a = netdev_priv(x->xso.dev);
	struct ipnc_sa *sa;

	spin_lock_bh(&a->sa_lock);
	sa = ipnc_sa_lookup(a, x->xso.offload_handle);
	if (sa && sa->xs == x && !sa->deleted) {
		sa->deleted = true;
		hash_del_rcu(&sa->node);
	}
	spin_unlock_bh(&a->sa_lock);
}

static struct ipnc_sa *ipnc_sa_by_state(struct ipnc_adapter *a, struct xfrm_state *x)
{
	struct ipnc_sa *sa;

	list_for_each_entry(sa, &a->sa_list, list)
		if (sa->xs == x)
			return sa;
	return NULL;
}

/* Process context: DELETE_SA on the card. */
static void ipnc_state_free(struct xfrm_state *x)
{
	struct ipnc_adapter *a = netdev_priv(x->xso.dev);
	struct ipnc_sa *sa;
	int err;

	mutex_lock(&a->sa_list_lock);
	sa = ipnc_sa_by_state(a, x);
	if (sa)
		list_del(&sa->list);
	mutex_unlock(&a->sa_list_lock);
	if (!sa)
		return;
	ipnc_state_delete(x);
	err = ipnc_delete_handles(a, &sa->handle, 1);
	if (err)
		netdev_warn(a->netdev, "DELETE_SA of handle %#x failed: %d\n", sa->handle, err);
	x->xso.offload_handle = 0;
	kfree_rcu(sa, rcu);
}

static bool ipnc_offload_ok(struct sk_buff *skb, struct xfrm_state *x)
{
	if (x->props.family == AF_INET) {
		/* The card refuses fragments and needs IPv4 options off unless it says so. */
		if (ip_hdr(skb)->ihl != 5 && !(((struct ipnc_adapter *)
					      netdev_priv(x->xso.dev))->features &
					      IPNC_FEATURES_IPV4_OPTIONS))
			return false;
	}
	return true;
}

/* Inbound ESN (called under x->lock from the replay code): push the new high half later. */
static void ipnc_advance_esn(struct xfrm_state *x)
{
	struct ipnc_adapter *a = netdev_priv(x->xso.dev);
	struct ipnc_sa *sa;

	rcu_read_lock();
	sa = ipnc_sa_lookup(a, x->xso.offload_handle);
	if (sa && sa->xs == x && sa->inbound && x->replay_esn) {
		WRITE_ONCE(sa->want_seq_hi, x->replay_esn->seq_hi);
		schedule_work(&a->sa_work);
	}
	rcu_read_unlock();
}

/* Packet offload: the card counts; give the stack the last numbers we read. */
static void ipnc_update_stats(struct xfrm_state *x)
{
	struct ipnc_adapter *a = netdev_priv(x->xso.dev);
	struct ipnc_sa *sa;

	if (x->xso.type != XFRM_DEV_OFFLOAD_PACKET)
		return;
	rcu_read_lock();
	sa = ipnc_sa_lookup(a, x->xso.offload_handle);
	if (sa && sa->xs == x) {
		/*
		 * The driver's count, from the same completions as ethtool's
		 * ipsec_tx_pkts / ipsec_rx_pkts. The card's (polled) count runs
		 * ahead by frames in flight or dropped on a full RX ring.
		 */
		x->curlft.packets = max_t(u64, x->curlft.packets, atomic64_read(&sa->drv_packets));
		x->curlft.bytes = max_t(u64, x->curlft.bytes, atomic64_read(&sa->drv_bytes));
	}
	rcu_read_unlock();
}

/* ---------------------------------------------------------------------- */
/* packet offload policies: our copy, for choosing the outbound SA */

static int ipnc_policy_add(struct xfrm_policy *xp, struct netlink_ext_ack *extack)
{
	struct ipnc_adapter *a = netdev_priv(xp->xdo.dev);
	struct ipnc_policy *p, *q;

	if (xp->xdo.type != XFRM_DEV_OFFLOAD_PACKET) {
		NL_SET_ERR_MSG_MOD(extack, "only packet offload policies");
		return -EINVAL;
	}
	if (!(a->features & IPNC_FEATURES_PACKET_OFFLOAD)) {
		NL_SET_ERR_MSG_MOD(extack, "card has no packet offload");
		return -EINVAL;
	}
	if (xp->action != XFRM_POLICY_ALLOW) {
		NL_SET_ERR_MSG_MOD(extack, "only allow policies can be offloaded");
		return -EINVAL;
	}
	/* No template: a bypass policy (IKE daemons add them for their own traffic). */
	if (xp->xfrm_nr > 1 || (xp->xfrm_nr && xp->xfrm_vec[0].id.proto != IPPROTO_ESP)) {
		NL_SET_ERR_MSG_MOD(extack, "policy must have one ESP template, or none (bypass)");
		return -EINVAL;
	}
	if (xp->xdo.dir != XFRM_DEV_OFFLOAD_OUT)
		return 0;	/* inbound: the card checks what arrives with its SAs */
	p = kzalloc(sizeof(*p), GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p->xp = xp;
	p->sel = xp->selector;
	p->priority = xp->priority;
	p->bypass = !xp->xfrm_nr;
	if (!p->bypass) {
		p->reqid = xp->xfrm_vec[0].reqid;
		p->tmpl_daddr = xp->xfrm_vec[0].id.daddr;
		p->family = xp->xfrm_vec[0].encap_family ? : xp->family;
	}
	spin_lock_bh(&a->sa_lock);
	list_for_each_entry(q, &a->policies, node)
		if (q->priority > p->priority)
			break;
	list_add_tail_rcu(&p->node, &q->node);	/* before the first lower-priority one */
	spin_unlock_bh(&a->sa_lock);
	return 0;
}

static void ipnc_policy_delete(struct xfrm_policy *xp)
{
	struct ipnc_adapter *a = netdev_priv(xp->xdo.dev);
	struct ipnc_policy *p;

	spin_lock_bh(&a->sa_lock);
	list_for_each_entry(p, &a->policies, node) {
		if (p->xp == xp) {
			list_del_rcu(&p->node);
			kfree_rcu(p, rcu);
			break;
		}
	}
	spin_unlock_bh(&a->sa_lock);
}

static void ipnc_policy_free(struct xfrm_policy *xp)
{
	ipnc_policy_delete(xp);
}

static const struct xfrmdev_ops ipnc_xfrmdev_ops = {
	.xdo_dev_state_add		= ipnc_state_add,
	.xdo_dev_state_delete		= ipnc_state_delete,
	.xdo_dev_state_free		= ipnc_state_free,
	.xdo_dev_offload_ok		= ipnc_offload_ok,
	.xdo_dev_state_advance_esn	= ipnc_advance_esn,
	.xdo_dev_state_update_stats	= ipnc_update_stats,
	.xdo_dev_policy_add		= ipnc_policy_add,
	.xdo_dev_policy_delete		= ipnc_policy_delete,
	.xdo_dev_policy_free		= ipnc_policy_free,
};

/* ---------------------------------------------------------------------- */
/* data path */

static bool ipnc_addr_match(const xfrm_address_t *pfx, const void *addr, u8 plen, u16 family)
{
	if (family == AF_INET)
		return addr4_match(pfx->a4, *(const __be32 *)addr, plen);
	return ipv6_prefix_equal((const struct in6_addr *)pfx->a6, addr, plen);
}

/*
 * Packet offload TX: the SA of the first offloaded policy, in priority order,
 * whose selector matches; none for a bypass policy or no match.
 */
static struct ipnc_sa *ipnc_packet_sa(struct ipnc_adapter *a, struct sk_buff *skb)
{
	const void *saddr, *daddr;
	struct ipnc_policy *p;
	u16 family, sport = 0, dport = 0;
	u8 proto;
	int thoff;

	if (list_empty(&a->policies))
		return NULL;
	if (skb->protocol == htons(ETH_P_IP)) {
		const struct iphdr *iph = ip_hdr(skb);

		family = AF_INET;
		saddr = &iph->saddr;
		daddr = &iph->daddr;
		proto = iph->protocol;
		thoff = skb_network_offset(skb) + iph->ihl * 4;
	} else if (skb->protocol == htons(ETH_P_IPV6)) {
		const struct ipv6hdr *ip6 = ipv6_hdr(skb);

		family = AF_INET6;
		saddr = &ip6->saddr;
		daddr = &ip6->daddr;
		proto = ip6->nexthdr;
		thoff = skb_network_offset(skb) + sizeof(*ip6);
	} else {
		return NULL;
	}
	if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) && skb->len >= thoff + 4) {
		const __be16 *ports = (const __be16 *)(skb->data + thoff);

		sport = ntohs(ports[0]);
		dport = ntohs(ports[1]);
	}
	list_for_each_entry_rcu(p, &a->policies, node) {
		const struct xfrm_selector *sel = &p->sel;
		struct ipnc_sa *sa;
		int bkt;

		if (sel->family != family ||
		    !ipnc_addr_match(&sel->saddr, saddr, sel->prefixlen_s, family) ||
		    !ipnc_addr_match(&sel->daddr, daddr, sel->prefixlen_d, family) ||
		    (sel->proto && sel->proto != proto) ||
		    ((sport ^ ntohs(sel->sport)) & ntohs(sel->sport_mask)) ||
		    ((dport ^ ntohs(sel->dport)) & ntohs(sel->dport_mask)))
			continue;
		if (p->bypass)
			return NULL;
		hash_for_each_rcu(a->sa_table, bkt, sa, node) {
			struct xfrm_state *x = sa->xs;

			if (sa->inbound || !sa->packet || sa->deleted ||
			    x->km.state != XFRM_STATE_VALID)
				continue;
			if (p->reqid ? x->props.reqid == p->reqid :
			    xfrm_addr_equal(&x->id.daddr, &p->tmpl_daddr, p->family))
				return sa;
		}
	}
	return NULL;
}

/* Fill the TX descriptor's offload fields; false = drop the frame. */
bool ipnc_ipsec_tx(struct ipnc_adapter *a, struct sk_buff *skb, struct ipnc_tx_desc *d)
{
	struct xfrm_offload *xo = xfrm_offload(skb);
	struct xfrm_state *x;
	u8 trailer[2];
	u32 icv;

	/* Without XFRM_XMIT the stack encrypted in software (CRYPTO_FALLBACK): send as is. */
	if (!xo || !(xo->flags & XFRM_XMIT))
		return true;
	x = xfrm_input_state(skb);
	if (!x || x->xso.dev != a->netdev || !x->xso.offload_handle ||
	    x->xso.type != XFRM_DEV_OFFLOAD_CRYPTO) {
		a->sw.ipsec_tx_no_handle++;
		return false;
	}
	/* The stack built the trailer: pad length and next header sit before the ICV. */
	icv = crypto_aead_authsize(x->data);
	if (skb->len < skb_transport_offset(skb) + icv + 2 ||
	    skb_copy_bits(skb, skb->len - icv - 2, trailer, 2))
		return false;
	d->flags = cpu_to_le16(IPNC_TX_FLAGS_IPSEC_CRYPTO);
	d->offload_handle = cpu_to_le32(x->xso.offload_handle);
	d->esp_offset = cpu_to_le16(skb_transport_offset(skb));
	d->pad_length = trailer[0];
	d->next_header = trailer[1];
	if (x->props.flags & XFRM_STATE_ESN) {
		/* RFC 4304: the high half is never sent; the card needs it for the ICV. */
		d->flags |= cpu_to_le16(IPNC_TX_FLAGS_SEQ_HI);
		d->seq_hi = cpu_to_le32(xo->seq.hi);
	}
	return true;
}

/*
 * Packet offload, tunnel mode: write the frame's Ethernet header for the outer
 * next hop. Linux sends some tunnel-mode frames (those without skb->sk) through
 * xfrm_dev_direct_output() (net/xfrm/xfrm_output.c), which only pushes
 * hard_header_len bytes and leaves the header to the hardware: "HW is
 * responsible for hard header packet mangling". The card puts the outer IP
 * header after this Ethernet header, so the outer destination's neighbour is
 * the right one for every tunnel-mode frame, whichever path it took.
 */
static bool ipnc_tunnel_l2(struct ipnc_adapter *a, struct sk_buff *skb, const struct xfrm_state *x)
{
	struct net_device *nd = a->netdev;
	struct neighbour *n = NULL;
	struct ethhdr *eth;
	u8 mac[ETH_ALEN];
	__be16 proto;

	if (skb_network_offset(skb) != ETH_HLEN || skb_cow_head(skb, 0))
		return false;
	proto = (skb_network_header(skb)[0] >> 4) == 6 ? htons(ETH_P_IPV6) : htons(ETH_P_IP);
	if (x->props.family == AF_INET)
		n = __ipv4_neigh_lookup_noref(nd, x->id.daddr.a4);
	else if (IS_ENABLED(CONFIG_IPV6))
		n = __ipv6_neigh_lookup_noref(nd, &x->id.daddr.in6);
	eth = (struct ethhdr *)skb->data;
	if (!n || !(READ_ONCE(n->nud_state) & NUD_VALID)) {
		if (n)
			neigh_event_send(n, NULL);
		/* the stack's own neighbour path filled it: keep that */
		return eth->h_proto == proto;
	}
	neigh_ha_snapshot(mac, n, nd);
	ether_addr_copy(eth->h_dest, mac);
	ether_addr_copy(eth->h_source, nd->dev_addr);
	eth->h_proto = proto;
	return true;
}

/* Packet offload, plain frame with no sec_path: the card encapsulates it. */
bool ipnc_ipsec_tx_plain(struct ipnc_adapter *a, struct sk_buff *skb, struct ipnc_tx_desc *d)
{
	bool ok = true;
	struct ipnc_sa *sa;

	rcu_read_lock();
	sa = ipnc_packet_sa(a, skb);
	if (sa && sa->xs->props.mode == XFRM_MODE_TUNNEL && !ipnc_tunnel_l2(a, skb, sa->xs)) {
		a->sw.ipsec_tx_no_neigh++;
		ok = false;
	} else if (sa) {
		d->flags = cpu_to_le16(IPNC_TX_FLAGS_IPSEC_PACKET);
		d->offload_handle = cpu_to_le32(sa->handle);
	}
	rcu_read_unlock();
	return ok;	/* no SA: not ours to protect, sent as is */
}

/*
 * NAPI context, TX completion with status OK: the card protected and sent the
 * frame. A refused one (OFFLOAD_FAILED, BAD_HANDLE, ...) is counted by its
 * TxStatus only, so ipsec_tx_pkts and the SA's packets are what left the card.
 */
void ipnc_ipsec_tx_done(struct ipnc_adapter *a, u32 handle, u32 bytes)
{
	struct ipnc_sa *sa;

	a->sw.ipsec_tx_pkts++;
	rcu_read_lock();
	sa = ipnc_sa_lookup(a, handle);
	if (sa && sa->packet) {
		atomic64_inc(&sa->drv_packets);
		atomic64_add(bytes, &sa->drv_bytes);
	}
	rcu_read_unlock();
}

#define IPNC_XO_AUTH_FAILED	(CRYPTO_TRANSPORT_AH_AUTH_FAILED | \
				 CRYPTO_TRANSPORT_ESP_AUTH_FAILED | \
				 CRYPTO_TUNNEL_AH_AUTH_FAILED | \
				 CRYPTO_TUNNEL_ESP_AUTH_FAILED)

static u8 ipnc_xo_status(u16 crypto_status)
{
	switch (crypto_status) {
	case IPNC_CRYPTO_STATUS_SUCCESS:
		return CRYPTO_SUCCESS;
	case IPNC_CRYPTO_STATUS_TRANSPORT_AH_AUTH_FAILED:
		return CRYPTO_TRANSPORT_AH_AUTH_FAILED;
	case IPNC_CRYPTO_STATUS_TRANSPORT_ESP_AUTH_FAILED:
		return CRYPTO_TRANSPORT_ESP_AUTH_FAILED;
	case IPNC_CRYPTO_STATUS_TUNNEL_AH_AUTH_FAILED:
		return CRYPTO_TUNNEL_AH_AUTH_FAILED;
	case IPNC_CRYPTO_STATUS_TUNNEL_ESP_AUTH_FAILED:
		return CRYPTO_TUNNEL_ESP_AUTH_FAILED;
	case IPNC_CRYPTO_STATUS_INVALID_PACKET_SYNTAX:
		return CRYPTO_INVALID_PACKET_SYNTAX;
	case IPNC_CRYPTO_STATUS_INVALID_PROTOCOL:
		return CRYPTO_INVALID_PROTOCOL;
	default:
		return CRYPTO_GENERIC_ERROR;
	}
}

/* NAPI context: turn the card's verdict into the skb's sec_path (like ixgbe_ipsec_rx). */
void ipnc_ipsec_rx(struct ipnc_adapter *a, struct sk_buff *skb, const struct ipnc_rx_desc *d)
{
	u16 flags = le16_to_cpu(d->wb_flags);
	u16 status = le16_to_cpu(d->crypto_status);
	u32 handle = le32_to_cpu(d->offload_handle);
	struct xfrm_offload *xo;
	struct ipnc_sa *sa;
	struct sec_path *sp;
	struct xfrm_state *x;

	rcu_read_lock();
	sa = handle ? ipnc_sa_lookup(a, handle) : NULL;
	if (sa && (flags & IPNC_RX_WB_FLAGS_SA_DELETE_REQ) && !READ_ONCE(sa->delete_req)) {
		WRITE_ONCE(sa->delete_req, true);
		schedule_work(&a->sa_work);
	}
	if (!(flags & IPNC_RX_WB_FLAGS_CRYPTO_DONE))
		goto out;
	if (!sa || !refcount_inc_not_zero(&sa->xs->refcnt)) {
		/* SA gone from the stack: leave the frame to software, which will drop it */
		a->sw.ipsec_rx_no_state++;
		goto out;
	}
	x = sa->xs;
	sp = secpath_set(skb);
	if (!sp) {
		xfrm_state_put(x);
		goto out;
	}
	sp->xvec[sp->len++] = x;
	sp->olen++;
	xo = xfrm_offload(skb);
	xo->flags = CRYPTO_DONE;
	xo->status = ipnc_xo_status(status);
	if (status == IPNC_CRYPTO_STATUS_SUCCESS) {
		/* one event for the global and the per-SA count */
		a->sw.ipsec_rx_pkts++;
		if (sa->packet) {
			/* plain IP packet bytes, as the card counts them (datasheet 7.9) */
			atomic64_inc(&sa->drv_packets);
			atomic64_add(skb->len, &sa->drv_bytes);
		}
		if (flags & IPNC_RX_WB_FLAGS_DECAPSULATED)
			a->sw.ipsec_rx_decap++;
	} else if (xo->status & IPNC_XO_AUTH_FAILED) {
		a->sw.ipsec_rx_auth_fail++;
	} else {
		a->sw.ipsec_rx_bad++;
	}
out:
	rcu_read_unlock();
}

/* Misc interrupt: an outbound SA was flagged; find which through LIST_SAS later. */
void ipnc_ipsec_sa_delete_req(struct ipnc_adapter *a)
{
	WRITE_ONCE(a->sa_delete_req_pending, true);
	schedule_work(&a->sa_work);
}

/* ---------------------------------------------------------------------- */
/* process-context work: ESN updates, SaDeleteReq -> expire events */

static int ipnc_update_sa(struct ipnc_adapter *a, struct ipnc_sa *sa, u32 hi)
{
	struct ipnc_v2_update_sa req = {
		.header_type = IPNC_NDIS_OBJECT_TYPE_DEFAULT,
		.header_revision = IPNC_NDIS_REVISION_1,
		.header_size = cpu_to_le16(sizeof(req)),
		.offload_handle = cpu_to_le32(sa->handle),
		.operation = cpu_to_le32(IPNC_V2_OPERATION_ESP),
		.spi = cpu_to_le32(sa->spi),
		.sequence_number_high_order = cpu_to_le32(hi),
	};

	return ipnc_admin_cmd(a, IPNC_OPCODE_V2_UPDATE_SA, &req, sizeof(req), NULL, NULL);
}

/* Report a soft expire, as xfrm's own lifetime timer would (RFC 4301 4.4.2.1). */
static void ipnc_report_expire(struct ipnc_adapter *a, struct ipnc_sa *sa)
{
	struct xfrm_state *x = sa->xs;

	spin_lock_bh(&x->lock);
	if (x->km.state == XFRM_STATE_VALID && !x->km.dying) {
		x->km.dying = 1;
		km_state_expired(x, 0, 0);
	}
	spin_unlock_bh(&x->lock);
	a->sw.ipsec_sa_delete_req++;
}

static void ipnc_mark_flagged(struct ipnc_adapter *a)
{
	struct ipnc_list_sas_request req = {
		.max_entries = cpu_to_le32(64),
	};
	struct ipnc_list_sas_response *head;
	struct ipnc_sa_list_entry *e;
	struct ipnc_sa *sa;
	u32 len, i, start = 0, guard;
	u8 *buf;

	buf = kmalloc(a->aq_buf_size, GFP_KERNEL);
	if (!buf)
		return;
	for (guard = 0; guard < 1024; guard++) {
		req.start_index = cpu_to_le32(start);
		len = a->aq_buf_size;
		if (ipnc_admin_cmd(a, IPNC_OPCODE_LIST_SAS, &req, sizeof(req), buf, &len) ||
		    len < sizeof(*head))
			break;
		head = (struct ipnc_list_sas_response *)buf;
		for (i = 0; i < le32_to_cpu(head->count) &&
		     sizeof(*head) + (i + 1) * sizeof(*e) <= len; i++) {
			e = (struct ipnc_sa_list_entry *)(buf + sizeof(*head)) + i;
			if (!(le32_to_cpu(e->flags) & IPNC_SA_LIST_FLAGS_DELETE_REQUESTED))
				continue;
			list_for_each_entry(sa, &a->sa_list, list)
				if (sa->handle == le32_to_cpu(e->offload_handle))
					sa->delete_req = true;
		}
		if (le32_to_cpu(head->next_index) == 0xffffffff ||
		    le32_to_cpu(head->next_index) == start)
			break;
		start = le32_to_cpu(head->next_index);
	}
	kfree(buf);
}

static void ipnc_sa_work(struct work_struct *work)
{
	struct ipnc_adapter *a = container_of(work, struct ipnc_adapter, sa_work);
	struct ipnc_sa *sa;

	mutex_lock(&a->sa_list_lock);
	if (xchg(&a->sa_delete_req_pending, false))
		ipnc_mark_flagged(a);
	list_for_each_entry(sa, &a->sa_list, list) {
		u32 want = READ_ONCE(sa->want_seq_hi);

		if (sa->esn && !sa->packet && want != sa->card_seq_hi) {
			if (!ipnc_update_sa(a, sa, want))
				sa->card_seq_hi = want;
		}
		if (READ_ONCE(sa->delete_req) && !sa->delete_req_reported) {
			sa->delete_req_reported = true;
			ipnc_report_expire(a, sa);
		}
	}
	mutex_unlock(&a->sa_list_lock);
}

static void ipnc_stats_work(struct work_struct *work)
{
	struct ipnc_adapter *a = container_of(to_delayed_work(work), struct ipnc_adapter,
					      stats_work);
	struct {
		__le32 handle;
		__le32 count;
		struct ipnc_sa_stats_entry e[2];
	} __packed resp;
	bool any = false;
	struct ipnc_sa *sa;

	mutex_lock(&a->sa_list_lock);
	list_for_each_entry(sa, &a->sa_list, list) {
		struct ipnc_handle_request req = { .offload_handle = cpu_to_le32(sa->handle) };
		u32 len = sizeof(resp);
		struct xfrm_state *x = sa->xs;

		if (!sa->packet)
			continue;
		any = true;
		if (ipnc_admin_cmd(a, IPNC_OPCODE_GET_SA_STATS, &req, sizeof(req), &resp, &len) ||
		    len < 8 + sizeof(resp.e[0]) || !le32_to_cpu(resp.count))
			continue;
		WRITE_ONCE(sa->packets, le64_to_cpu(resp.e[0].packets));
		WRITE_ONCE(sa->bytes, le64_to_cpu(resp.e[0].bytes));
		/* Hard and soft lifetimes become the stack's expire events. */
		spin_lock_bh(&x->lock);
		if (x->km.state == XFRM_STATE_VALID) {
			x->curlft.packets = max_t(u64, x->curlft.packets,
						  atomic64_read(&sa->drv_packets));
			x->curlft.bytes = max_t(u64, x->curlft.bytes,
						atomic64_read(&sa->drv_bytes));
			xfrm_state_check_expire(x);
		}
		spin_unlock_bh(&x->lock);
	}
	mutex_unlock(&a->sa_list_lock);
	if (any)
		schedule_delayed_work(&a->stats_work, IPNC_STATS_INTERVAL);
}

/*
 * debugfs <root>/ipsec_nic/<pci>/ipsec: the card's own SA table (LIST_SAS), in the
 * spirit of netdevsim's ipsec file that the kernel selftests read back.
 */
static int ipnc_sa_table_show(struct seq_file *m, void *unused)
{
	struct ipnc_adapter *a = m->private;
	struct ipnc_list_sas_request req = { .max_entries = cpu_to_le32(64) };
	struct ipnc_list_sas_response *head;
	struct ipnc_sa_list_entry *e;
	u32 len, i, start = 0, guard, row = 0;
	bool first = true;
	u8 *buf;
	int err = 0;

	buf = kmalloc(a->aq_buf_size, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	for (guard = 0; guard < 1024; guard++) {
		req.start_index = cpu_to_le32(start);
		len = a->aq_buf_size;
		err = ipnc_admin_cmd(a, IPNC_OPCODE_LIST_SAS, &req, sizeof(req), buf, &len);
		if (err || len < sizeof(*head)) {
			err = err ? err : -EPROTO;
			break;
		}
		head = (struct ipnc_list_sas_response *)buf;
		if (first) {
			seq_printf(m, "SA count=%u tx=%llu rx=%llu\n", le32_to_cpu(head->total),
				   READ_ONCE(a->sw.ipsec_tx_pkts), READ_ONCE(a->sw.ipsec_rx_pkts));
			first = false;
		}
		for (i = 0; i < le32_to_cpu(head->count) &&
		     sizeof(*head) + (i + 1) * sizeof(*e) <= len; i++, row++) {
			u32 flags;

			e = (struct ipnc_sa_list_entry *)(buf + sizeof(*head)) + i;
			flags = le32_to_cpu(e->flags);
			seq_printf(m, "sa[%u] handle=0x%08x %s spi=0x%08x proto=0x%02x mode=%s family=%u%s%s%s%s\n",
				   row, le32_to_cpu(e->offload_handle),
				   e->direction == 1 ? "rx" : "tx", le32_to_cpu(e->spi), e->proto,
				   e->mode ? "tunnel" : "transport", e->family,
				   flags & IPNC_SA_LIST_FLAGS_PACKET_OFFLOAD ?
				   " packet" : " crypto",
				   flags & IPNC_SA_LIST_FLAGS_ESN ? " esn" : "",
				   flags & IPNC_SA_LIST_FLAGS_UDP_ENCAP ? " udp-encap" : "",
				   flags & IPNC_SA_LIST_FLAGS_DELETE_REQUESTED ?
				   " delete-requested" : "");
		}
		if (le32_to_cpu(head->next_index) == 0xffffffff ||
		    le32_to_cpu(head->next_index) == start)
			break;
		start = le32_to_cpu(head->next_index);
	}
	kfree(buf);
	return err;
}
DEFINE_SHOW_ATTRIBUTE(ipnc_sa_table);

void ipnc_debugfs_init(struct ipnc_adapter *a, struct dentry *root)
{
	if (IS_ERR_OR_NULL(root))
		return;
	a->debugfs = debugfs_create_dir(pci_name(a->pdev), root);
	debugfs_create_file("ipsec", 0400, a->debugfs, a, &ipnc_sa_table_fops);
}

void ipnc_debugfs_exit(struct ipnc_adapter *a)
{
	debugfs_remove_recursive(a->debugfs);
	a->debugfs = NULL;
}

void ipnc_ipsec_init(struct ipnc_adapter *a)
{
	struct net_device *nd = a->netdev;
	netdev_features_t esp = NETIF_F_HW_ESP;

	spin_lock_init(&a->sa_lock);
	hash_init(a->sa_table);
	mutex_init(&a->sa_list_lock);
	INIT_LIST_HEAD(&a->sa_list);
	INIT_LIST_HEAD(&a->policies);
	INIT_WORK(&a->sa_work, ipnc_sa_work);
	INIT_DELAYED_WORK(&a->stats_work, ipnc_stats_work);
	if (!(a->features & IPNC_FEATURES_CRYPTO_OFFLOAD) || !(a->features & IPNC_FEATURES_ESP))
		return;
	nd->xfrmdev_ops = &ipnc_xfrmdev_ops;
	nd->features |= esp;
	nd->hw_features |= esp;
	nd->hw_enc_features |= esp;
}

/* After unregister_netdev: the stack has freed our SAs; make sure the card has too. */
void ipnc_ipsec_stop(struct ipnc_adapter *a)
{
	struct ipnc_global_stats *fw;
	struct ipnc_sa *sa, *tmp;

	cancel_work_sync(&a->sa_work);
	cancel_delayed_work_sync(&a->stats_work);
	mutex_lock(&a->sa_list_lock);
	list_for_each_entry_safe(sa, tmp, &a->sa_list, list) {
		netdev_warn(a->netdev, "SA handle %#x left behind by the stack; deleting\n",
			    sa->handle);
		ipnc_delete_handles(a, &sa->handle, 1);
		list_del(&sa->list);
		kfree_rcu(sa, rcu);
	}
	mutex_unlock(&a->sa_list_lock);
	fw = kzalloc(sizeof(*fw), GFP_KERNEL);
	if (fw && !ipnc_get_fw_stats(a, fw) && fw->sa_bundles)
		netdev_warn(a->netdev, "%u SA bundles still on the card\n",
			    le32_to_cpu(fw->sa_bundles));
	kfree(fw);
}

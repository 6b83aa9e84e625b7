"""A URDF robot description for the runtime's kinematics, as a real arm's maker ships one.

The URDF here is written from the project's MJCF through MuJoCo's own reading of it (another parser than
Pinocchio's two), so the kinematics from the URDF must be the MJCF's: the same joints, limits and frames.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kinematics import ARM_JOINTS, ArmKinematics, IkConfig, Pose, default_description

pin = pytest.importorskip("pinocchio", reason="the kinematics need Pinocchio (pip install pin==4.1.0)")
mujoco = pytest.importorskip("mujoco", reason="the URDF is written from MuJoCo's reading of the MJCF")
pytestmark = pytest.mark.timeout(120)

MOTORS = list(ARM_JOINTS) + ["gripper"]


def _origin(pos, quat) -> str:
    rotation = np.zeros(9)
    mujoco.mju_quat2Mat(rotation, np.asarray(quat, dtype=np.float64))
    rpy = pin.rpy.matrixToRpy(rotation.reshape(3, 3))
    return f'<origin xyz="{_numbers(pos)}" rpy="{_numbers(rpy)}"/>'


def _numbers(values) -> str:
    return " ".join(f"{float(v):.15g}" for v in values)


def urdf_from_mjcf(path: Path, root: str = "base", visual: str = "") -> str:
    """A URDF of the MJCF's bodies below `root` (the root link: fixed, as a real arm's base is): one link per body
    and per site (sites as fixed joints), each body's joint revolute or prismatic with its range, or continuous
    where the MJCF leaves it unlimited (the wheels). `visual` goes into every link (e.g. a mesh reference)."""
    m = mujoco.MjModel.from_xml_path(str(path))
    body, joint, site = mujoco.mjtObj.mjOBJ_BODY, mujoco.mjtObj.mjOBJ_JOINT, mujoco.mjtObj.mjOBJ_SITE
    root_id = mujoco.mj_name2id(m, body, root)

    def below_root(b: int) -> bool:
        while b not in (0, root_id):
            b = int(m.body_parentid[b])
        return b == root_id

    def link(name: str) -> str:
        return f'  <link name="{name}">{visual}</link>'

    kinds = {int(mujoco.mjtJoint.mjJNT_HINGE): "revolute", int(mujoco.mjtJoint.mjJNT_SLIDE): "prismatic"}
    lines = ['<?xml version="1.0"?>', '<robot name="edgeact_arm">', link(root)]
    for b in range(1, m.nbody):
        if b == root_id or not below_root(b):
            continue
        name, parent = mujoco.mj_id2name(m, body, b), mujoco.mj_id2name(m, body, int(m.body_parentid[b]))
        joints = [j for j in range(m.njnt) if m.jnt_bodyid[j] == b]
        assert len(joints) <= 1 and not any(np.any(m.jnt_pos[j]) for j in joints), "one joint at the body's origin"
        lines.append(link(name))
        tree = f'<parent link="{parent}"/><child link="{name}"/>{_origin(m.body_pos[b], m.body_quat[b])}'
        if not joints:
            lines.append(f'  <joint name="{name}_fixed" type="fixed">{tree}</joint>')
            continue
        j = joints[0]
        kind, limit = kinds[int(m.jnt_type[j])], (f'<limit lower="{m.jnt_range[j][0]:.15g}" '
                                                   f'upper="{m.jnt_range[j][1]:.15g}" effort="3" velocity="5"/>')
        if not m.jnt_limited[j]:
            kind, limit = "continuous", ""
        lines.append(f'  <joint name="{mujoco.mj_id2name(m, joint, j)}" type="{kind}">{tree}'
                     f'<axis xyz="{_numbers(m.jnt_axis[j])}"/>{limit}</joint>')
    for s in range(m.nsite):
        if below_root(int(m.site_bodyid[s])):
            name = mujoco.mj_id2name(m, site, s)
            lines += [link(name), f'  <joint name="{name}_fixed" type="fixed"><parent link="'
                                  f'{mujoco.mj_id2name(m, body, int(m.site_bodyid[s]))}"/><child link="{name}"/>'
                                  f'{_origin(m.site_pos[s], m.site_quat[s])}</joint>']
    return "\n".join(lines + ["</robot>", ""])


@pytest.fixture(scope="module")
def urdf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("urdf") / "arm.urdf"
    path.write_text(urdf_from_mjcf(default_description()), encoding="utf-8")
    return path


def inner_configs(arm: ArmKinematics, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(arm.lower_rad, arm.upper_rad, size=(count, len(arm.joints)))


def test_a_urdf_gives_the_same_kinematics_as_the_mjcf(urdf):
    """Joints, limits, every frame the runtime reads (hand, camera) and IK: the MJCF's, to numerical precision."""
    mjcf, from_urdf = ArmKinematics(), ArmKinematics(urdf)
    assert from_urdf.joints == ARM_JOINTS
    np.testing.assert_allclose(from_urdf.lower_rad, mjcf.lower_rad)
    np.testing.assert_allclose(from_urdf.upper_rad, mjcf.upper_rad)
    for q in inner_configs(mjcf, 25, seed=3):
        for frame in ("ee", "camera_optical"):
            a, b = mjcf.frame_pose(frame, q), from_urdf.frame_pose(frame, q)
            np.testing.assert_allclose(b.position_m, a.position_m, atol=1e-9)
            np.testing.assert_allclose(b.rotation, a.rotation, atol=1e-9)
    start = np.array([0.1, 0.4, -0.2, 0.5, 0.1])
    target = mjcf.forward(start).moved([0.03, -0.02, 0.02, 0.0, 0.0, 0.0])
    solved = from_urdf.solve(target, start)       # five joints: the position, and the orientation as near as it goes
    np.testing.assert_allclose(mjcf.forward(solved.q_rad).position_m, target.position_m, atol=1e-4)
    np.testing.assert_allclose(solved.q_rad, mjcf.solve(target, start).q_rad, atol=1e-6)


def test_a_urdf_in_the_camera_frame_expresses_poses_as_the_mjcf(urdf):
    mjcf, from_urdf = (ArmKinematics(d, reference_frame="camera_optical") for d in (None, urdf))
    for q in inner_configs(mjcf, 5, seed=4):
        np.testing.assert_allclose(from_urdf.forward(q).position_m, mjcf.forward(q).position_m, atol=1e-9)


def test_the_ik_mapper_from_a_urdf_commands_what_the_mjcf_one_does(urdf):
    """The same action from the same joints: the same joint goals, gripper included."""
    mappers = [IkConfig(description=d, frame="camera_optical").make_mapper(MOTORS) for d in ("", str(urdf))]
    start = dict(zip(MOTORS, [0.1, 0.4, -0.2, 0.5, 0.1, 0.3]))
    action = np.array([0.01, -0.02, 0.015, 0.05, -0.05, 0.0, 0.8])
    goals = [m.apply(start, action, 0.5) for m in mappers]
    assert goals[0].keys() == goals[1].keys() == set(MOTORS)
    for joint in MOTORS:
        assert goals[1][joint] == pytest.approx(goals[0][joint], abs=1e-6)
    assert any(abs(goals[0][j] - start[j]) > 1e-3 for j in ARM_JOINTS)      # the action moved the arm


def test_meshes_are_not_opened(tmp_path):
    """A maker's URDF names its meshes by package:// paths that need not exist on the robot: only the kinematic
    tree is read."""
    visual = '<visual><geometry><mesh filename="package://so_arm/meshes/part.stl"/></geometry></visual>'
    path = tmp_path / "arm.urdf"
    path.write_text(urdf_from_mjcf(default_description(), visual=visual), encoding="utf-8")
    assert "package://" in path.read_text()
    arm = ArmKinematics(path)
    assert arm.forward(np.zeros(5)).position_m == pytest.approx(ArmKinematics().forward(np.zeros(5)).position_m)


def test_a_continuous_arm_joint_is_refused_with_the_fix(tmp_path, urdf):
    text = urdf.read_text()
    head, rest = text.split('<joint name="wrist_roll" type="revolute">', 1)
    body, tail = rest.split("</joint>", 1)
    body = body.split("<limit", 1)[0]
    path = tmp_path / "continuous.urdf"
    path.write_text(f'{head}<joint name="wrist_roll" type="continuous">{body}</joint>{tail}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"joint 'wrist_roll' is continuous .* declare it type=\"revolute\" with "
                                          r"<limit"):
        ArmKinematics(path)
    # Locked joints may be continuous (the wheels are): only the arm's joints need limits.
    ArmKinematics(path, joints=ARM_JOINTS[:4], ee_frame="wrist")


def _renamed_link(text: str, old: str, new: str) -> str:
    return text.replace(f'<link name="{old}">', f'<link name="{new}">').replace(f'link="{old}"', f'link="{new}"')


def test_a_link_named_like_a_joint_is_the_link(tmp_path, urdf):
    """Makers' URDFs name a link like a joint (SO-101's: link "gripper", the jaw's joint "gripper"; here also an arm
    joint's): the description loads, the arm's kinematics are unchanged, and the name means the link."""
    text = _renamed_link(_renamed_link(urdf.read_text(), "hand", "gripper"), "forearm", "elbow_flex")
    path = tmp_path / "clash.urdf"
    path.write_text(text, encoding="utf-8")
    mjcf, clash = ArmKinematics(), ArmKinematics(path)
    for q in inner_configs(mjcf, 5, seed=5):
        np.testing.assert_allclose(clash.forward(q).position_m, mjcf.forward(q).position_m, atol=1e-9)
        for link, body in (("gripper", "hand"), ("elbow_flex", "forearm")):
            np.testing.assert_allclose(clash.frame_pose(link, q).position_m, mjcf.frame_pose(body, q).position_m,
                                       atol=1e-9)
    mapper = IkConfig(description=str(path), ee_frame="gripper").make_mapper(MOTORS)
    assert mapper.kinematics.ee_frame == "gripper"


def _with_limit(text: str, joint: str, limit: str) -> str:
    head, rest = text.split(f'<joint name="{joint}" type="revolute">', 1)
    body, tail = rest.split("</joint>", 1)
    return f'{head}<joint name="{joint}" type="revolute">{body.split("<limit", 1)[0]}{limit}</joint>{tail}'


@pytest.mark.parametrize("limit, shown", [('<limit effort="3" velocity="5"/>', "[0, 0]"),
                                          ('<limit lower="0" upper="0" effort="3" velocity="5"/>', "[0, 0]"),
                                          ('<limit lower="1.5" upper="-1.5" effort="3" velocity="5"/>', "[1.5, -1.5]")])
def test_an_arm_joint_without_its_travel_is_refused(tmp_path, urdf, limit, shown):
    """A <limit> without lower/upper reads as [0, 0] (exporters also write 0 0): the IK would clamp every goal of
    that joint to 0, a move no action asked for."""
    path = tmp_path / "limits.urdf"
    path.write_text(_with_limit(urdf.read_text(), "elbow_flex", limit), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"joint 'elbow_flex' of limits.urdf has the limits \{shown[:-1]}\]: .*"
                                          r"lower < upper; give <limit lower=\.\.\. upper=\.\.\.> in radians"):
        ArmKinematics(path)


@pytest.mark.parametrize("text", [
    '<robot name="arm" xmlns:xacro="http://www.ros.org/wiki/xacro"><xacro:property name="l" value="0.1"/>'
    '<link name="base"/></robot>',
    '<robot name="arm"><link name="base"/><link name="a"/><joint name="j" type="revolute"><parent link="base"/>'
    '<child link="a"/><limit lower="${-pi/2}" upper="${pi/2}" effort="1" velocity="1"/></joint></robot>',
])
def test_a_xacro_file_is_refused_with_the_command_that_expands_it(tmp_path, text):
    path = tmp_path / "arm.urdf.xacro"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is a xacro file .* `xacro arm.urdf.xacro > arm.urdf`"):
        ArmKinematics(path)


def test_a_urdf_in_an_xml_namespace_loads(tmp_path, urdf):
    path = tmp_path / "namespaced.urdf"
    path.write_text(urdf.read_text().replace('<robot name="edgeact_arm">',
                                             '<robot name="edgeact_arm" xmlns="http://drake.mit.edu">'), encoding="utf-8")
    q = np.array([0.1, 0.4, -0.2, 0.5, 0.1])
    np.testing.assert_allclose(ArmKinematics(path).forward(q).position_m, ArmKinematics().forward(q).position_m,
                               atol=1e-9)


@pytest.mark.parametrize("text, message", [
    ('<?xml version="1.0"?><sdf version="1.7"><model name="arm"/></sdf>',
     r"root element is <sdf>, neither a URDF's <robot> nor an MJCF's <mujoco>"),
    ('<robot name="arm"><link name="base"></robot>', r"is not valid XML .*give a URDF or MJCF file"),
])
def test_a_file_that_is_not_a_urdf_or_mjcf_is_refused(tmp_path, text, message):
    path = tmp_path / "arm.sdf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        ArmKinematics(path)


def test_a_urdf_without_the_named_frame_lists_its_frames(urdf):
    with pytest.raises(ConfigError, match=r"no frame 'tool0' in arm.urdf; its frames: .*\bee\b"):
        ArmKinematics(urdf, ee_frame="tool0")


def _config_with(description: str) -> dict:
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    data = mujoco_robot_config_dict()
    assert data["actions"]["type"] == "ik"
    data["actions"]["description"] = description
    return data


def test_a_relative_description_is_beside_the_config_file(tmp_path, urdf, monkeypatch):
    """As estop.file and the bundle are: wherever `edgeact run` starts; `~` is the user's home."""
    from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict

    folder = tmp_path / "robot"
    folder.mkdir()
    (folder / "arm.urdf").write_text(urdf.read_text(), encoding="utf-8")
    (folder / "robot.json").write_text(json.dumps(_config_with("arm.urdf")), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_robot_config(folder / "robot.json")
    assert Path(config.actions.description) == folder / "arm.urdf"
    assert config.actions.make_mapper(MOTORS).kinematics.description == folder / "arm.urdf"
    with pytest.raises(ConfigError, match=r"robot description arm.urdf \(actions.description\) not found"):
        robot_config_from_dict(_config_with("arm.urdf"))            # no file: the working directory's
    monkeypatch.setenv("HOME", str(folder))
    (folder / "home.json").write_text(json.dumps(_config_with("~/arm.urdf")), encoding="utf-8")
    assert Path(load_robot_config(folder / "home.json").actions.description) == folder / "arm.urdf"


@pytest.mark.slow
def test_hand_eye_calibration_runs_on_the_urdf_beside_the_config(tmp_path, capsys):
    """End to end on the simulated robot: the arm is moved through the bus by the URDF's kinematics, its hand's
    poses are the URDF's FK, and the camera it finds is where the URDF (and the simulator) put it."""
    pytest.importorskip("cv2", reason="hand-eye calibration needs OpenCV (the calibration extra)")
    from edgeact.runtime.cli import main
    from edgeact.runtime.trace_follow import camera_pose_from_dict

    (tmp_path / "arm.urdf").write_text(urdf_from_mjcf(default_description()), encoding="utf-8")
    config = tmp_path / "robot.json"
    config.write_text(json.dumps(_config_with("arm.urdf")), encoding="utf-8")
    code = main(["calibrate-hand-eye", str(config), "--camera-size", "640x480", "--poses", "8", "--write"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    pose: Pose = camera_pose_from_dict(json.loads(config.read_text())["plan"]["trace_camera_pose"])
    truth = ArmKinematics().frame_pose("camera_optical", np.zeros(5))
    assert np.linalg.norm(pose.position_m - truth.position_m) < 0.005
    assert np.degrees(np.arccos(np.clip((np.trace(pose.rotation.T @ truth.rotation) - 1) / 2, -1, 1))) < 0.5

# The teachers of the paper's tables, and the run folders of its rows; sourced by run_knn.sh and the
# launchers (scripts/unsupervised/distill.sh, scripts/lincls/evaluate.sh, scripts/semi/evaluate.sh).
# Checkpoints as the public releases ship them; bag files as `bash run_knn.sh NAME` writes them.
TEACHERS='
# name    checkpoint                                       backbone    bag file
moco200   checkpoints/moco_v2_200ep_pretrain.pth.tar       resnet50    bags/moco_v2_200ep_k5.npy
moco800   checkpoints/moco_v2_800ep_pretrain.pth.tar       resnet50    bags/moco_v2_800ep_k5.npy
r152      checkpoints/moco_v2_r152.pth.tar                 resnet152   bags/moco_v2_r152_k5.npy
swav_w2   checkpoints/swav_RN50w2_400ep_pretrain.pth.tar   resnet50w2  bags/swav_w2_k5.npy
'

teacher_row() {  # NAME -> TEACHER_CHECKPOINT, TEACHER_BACKBONE, TEACHER_BAGS of its row
  local row
  row=$(awk -v name="$1" '$1 == name {print $2, $3, $4}' <<< "$TEACHERS")
  if [ -z "$row" ]; then
    echo "unknown teacher '$1'; scripts/teachers.sh knows: $(awk '/^[a-z]/ {printf "%s ", $1}' <<< "$TEACHERS")" >&2
    return 1
  fi
  read -r TEACHER_CHECKPOINT TEACHER_BACKBONE TEACHER_BAGS <<< "$row"
}

run_name() {  # METHOD STUDENT TEACHER -> runs/<student>_<teacher>[_<method>], or runs/<student>_moco_alone
  local student
  case $2 in
    resnet*) student=r${2#resnet} ;;
    efficientnet_b0) student=effb0 ;;
    mobilenet_v3_large) student=mbv3 ;;
    *) student=$2 ;;
  esac
  case $1 in
    moco) echo "runs/${student}_moco_alone" ;;
    bingo) echo "runs/${student}_${3}" ;;
    *) echo "runs/${student}_${3}_${1}" ;;
  esac
}
